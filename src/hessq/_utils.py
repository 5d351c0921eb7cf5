"""Small helpers every stage shares: the model's device, a mode switch that restores itself, batch inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module | Any) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def training_mode(model: nn.Module | Any, training: bool = False) -> Iterator[Any]:
    """Put ``model`` in train (``True``) or eval mode for the block, and restore its mode after, even on error.

    Anything that is not an ``nn.Module`` (a plain callable) passes through untouched.
    """
    if not isinstance(model, nn.Module):
        yield model
        return
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def batch_inputs(batch: Any) -> Any:
    """The inputs of a batch: the first item of an ``(inputs, targets)`` pair, or the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def move_to(obj: Any, device: torch.device) -> Any:
    """Every tensor in ``obj`` (a tensor, or tuples, lists and dicts of them) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to(o, device) for k, o in obj.items()}
    return obj
