"""Scoring a classifier on batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from hessq._checks import check_class_targets, check_inputs, check_model, split_batch
from hessq._errors import ConfigTypeError, HessqError, InputDataError
from hessq._utils import model_device, training_mode
from hessq.graph import capture


def _scores(model: Callable, x: torch.Tensor, b: int) -> torch.Tensor:
    """``model(x)``; the model's own error on a batch (a shape mismatch, mostly) names the shape given."""
    try:
        out = model(x)
    except HessqError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputDataError(f"the model cannot run on batch {b}: inputs of shape {tuple(x.shape)} give "
                             f"{type(exc).__name__}: {first}. Pass inputs shaped as the model expects") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputDataError(f"accuracy needs (batch, classes) scores; the model returns {type(out).__name__}"
                             + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""))
    return out


@torch.no_grad()
def accuracy(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], batches: Iterable, *, progress: bool = False,
             desc: str = "evaluate") -> float:
    """Top-1 accuracy of ``model`` (in eval mode) over (inputs, targets) batches, on the model's device.

    ``model`` may also be any callable from inputs to scores, e.g. a :class:`hessq.IntegerModel`.
    ``batches`` is read once, so a one-shot iterator is fine. Each batch must be an (inputs,
    targets) pair; for an ``nn.Module`` the inputs must be in its float dtype without NaN (other
    callables check their own inputs), and targets must be class indices the scores have.
    """
    is_module = isinstance(model, nn.Module)
    if is_module:
        model = capture(check_model(model))
    elif not callable(model):
        raise ConfigTypeError(f"model must be an nn.Module or a callable from inputs to scores, got {type(model).__name__}")
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise InputDataError(f"batches must be an iterable of (inputs, targets) pairs (a list, a DataLoader), "
                             f"got {type(batches).__name__}")
    device = model_device(model)
    correct = total = 0
    with training_mode(model, False):
        for b, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
            try:
                x, y = split_batch(batch, model=model)
            except InputDataError as exc:
                raise InputDataError(f"batch {b}: {exc}") from None
            if not isinstance(x, torch.Tensor):
                raise InputDataError(f"batch {b}'s inputs must be a tensor, got {type(x).__name__}")
            if is_module:
                check_inputs(x, model, where=f"batch {b}'s inputs")
            scores = _scores(model, x.to(device), b)
            check_class_targets(y, int(scores.shape[1]), where=f"batch {b}'s targets")
            if y.dim() != 1 or len(y) != len(scores):
                raise InputDataError(f"batch {b} has {len(scores)} inputs but targets of shape {tuple(y.shape)}; "
                                     "give one class index per input")
            pred = scores.argmax(1).cpu()
            correct += int((pred == y.cpu()).sum())
            total += len(y)
    if total == 0:
        raise InputDataError("no batches to evaluate: `batches` is empty (an exhausted iterator?)")
    return correct / total
