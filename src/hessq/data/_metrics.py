"""Scoring a classifier on batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from hessq._errors import ConfigError


@torch.no_grad()
def accuracy(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], batches: Iterable, *, progress: bool = False,
             desc: str = "evaluate") -> float:
    """Top-1 accuracy of ``model`` (in eval mode) over (inputs, targets) batches, on the model's device.

    ``model`` may also be any callable from inputs to scores, e.g. a :class:`hessq.IntegerModel`.
    """
    is_module = isinstance(model, nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu")) if is_module else torch.device("cpu")
    correct = total = 0
    try:
        for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False):
            pred = model(x.to(device)).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    finally:
        if is_module:
            model.train(was_training)
    if total == 0:
        raise ConfigError("no batches to evaluate")
    return correct / total
