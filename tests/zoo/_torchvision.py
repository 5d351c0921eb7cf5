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

from hessq._compat import allow_torchvision_import


def torchvision():
    """The torchvision module, importable on the CPU torch; skips the test when torchvision is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed: it is a test-only dependency "
                    "(pip install --no-deps torchvision==0.28.0; make venv installs it)")
    allow_torchvision_import()
    import torchvision as tv

    return tv


def torchvision_ops():
    return torchvision().ops


def torchvision_models():
    return torchvision().models
