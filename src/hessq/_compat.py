"""Importing optional packages that misbehave on this CPU-only torch, with errors that say what to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from hessq._errors import MissingDependencyError

# torchvision's compiled extension is CUDA-only on the package index: on the CPU torch its ops are
# never defined, and importing torchvision fails where its Python code registers fake kernels for
# them ("operator torchvision::nms does not exist"). transformers imports torchvision whenever it is
# installed, so a schema (no kernel) for those two ops lets both import; the compiled ops stay unusable.
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARIES: list = []  # a torch.library.Library must stay alive for its definitions to stay registered


def _schema_exists(qualname: str) -> bool:
    try:
        torch._C._get_schema(qualname, "")
        return True
    except RuntimeError:
        return False


def allow_torchvision_import() -> None:
    """Make ``import torchvision`` work on the CPU torch when its compiled extension does not load."""
    if importlib.util.find_spec("torchvision") is None:
        return
    missing = [n for n in _TORCHVISION_SCHEMAS if not _schema_exists(f"torchvision::{n}")]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_TORCHVISION_SCHEMAS[name])
    _LIBRARIES.append(lib)


def import_transformers() -> ModuleType:
    """The ``transformers`` module, or a :class:`MissingDependencyError` saying how to install it."""
    if importlib.util.find_spec("transformers") is None:
        raise MissingDependencyError(
            "Hugging Face models need the transformers package: pip install 'hessq[text]' "
            "(or pip install transformers tokenizers safetensors)")
    allow_torchvision_import()
    return importlib.import_module("transformers")
