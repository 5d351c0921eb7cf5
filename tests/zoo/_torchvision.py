"""torchvision for the tests, on the CPU build of torch (a test-only dependency).

The package index holds only the CUDA build of torchvision 0.28.0 (the release for torch 2.13). Its compiled
extension does not load against the CPU torch, so the operators it would define are missing, and importing
torchvision fails where its Python code registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
("operator torchvision::nms does not exist"). Defining those two schemas with ``torch.library`` first (a schema
and no kernel) lets the import and every classification model work: none of them calls nms. The compiled ops
(nms, deform_conv2d, roi_align) stay unusable.

Install it into the venv with ``pip install --no-deps torchvision==0.28.0`` (``make venv`` does); the tests that
need it are skipped, with this reason, when it is absent.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: list = []  # the torch.library.Library must stay alive for its definitions to stay registered


def _define_stub_schemas() -> None:
    missing = [name for name in _SCHEMAS if not torch._C._dispatch_has_kernel(f"torchvision::{name}")
               and not _schema_exists(name)]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_SCHEMAS[name])
    _LIBRARY.append(lib)


def _schema_exists(name: str) -> bool:
    try:
        torch._C._get_schema(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def torchvision():
    """The torchvision module, importable on the CPU torch; skips the test when torchvision is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed: it is a test-only dependency "
                    "(pip install --no-deps torchvision==0.28.0; make venv installs it)")
    _define_stub_schemas()
    import torchvision as tv

    return tv


def torchvision_ops():
    return torchvision().ops


def torchvision_models():
    return torchvision().models
