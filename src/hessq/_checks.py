"""Checks every stage runs on what a user hands in, so a mistake is one clear error, not a deep torch one.

Each raises a :class:`hessq.HessqError` subclass naming what is wrong and how to fix it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from hessq._errors import ConfigError, ConfigTypeError, InputDataError, ModelError
from hessq._utils import pad_token_id_of, split_mapping_batch


def check_model(model: Any, what: str = "model", *, finite: bool = True) -> nn.Module:
    """``model`` when it is a usable ``nn.Module``: not on the meta device, with finite weights."""
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise ModelError(f"{what} has tensors on the meta device ({name!r}): they hold no values; load real "
                             "weights first (model.to_empty(device='cpu') then load_state_dict, or build it on the CPU)")
        if finite and t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"{what} has NaN or infinite values in {name!r}: quantization needs finite weights; "
                             "check the checkpoint or the training run that produced it")
    return model


def model_float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def check_inputs(x: Any, model: nn.Module | None = None, *, where: str = "inputs") -> Any:
    """Tensors in ``x`` (a tensor, or a tuple/list/dict of them) that a float model can take.

    Integer images (uint8 pixels) and float dtypes other than the model's are refused with the
    conversion to make; NaN or infinite floats are refused. Non-float tensors inside a tuple or
    dict (token ids, masks) pass as they are.
    """
    dtype = model_float_dtype(model) if model is not None else torch.float32
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.uint8:
            raise InputDataError(f"{where} are raw uint8 pixels; convert them as the model was trained, e.g. "
                                 "x.float() / 255 and its normalisation")
        if x.is_floating_point():
            if x.dtype != dtype:
                raise InputDataError(f"{where} are {x.dtype}, the model computes in {dtype}; convert them with x.to({dtype})")
            if not torch.isfinite(x).all():
                raise InputDataError(f"{where} hold NaN or infinite values ({int((~torch.isfinite(x)).sum())} of "
                                     f"{x.numel()}); clean the data first")
        elif x.dtype == torch.bool or x.is_complex():
            raise InputDataError(f"{where} are {x.dtype}; the model takes {dtype} tensors")
        return x
    if isinstance(x, (tuple, list)):
        for i, item in enumerate(x):
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                check_inputs(item, model, where=f"{where}[{i}]")
        return x
    if isinstance(x, dict):
        for k, item in x.items():
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                check_inputs(item, model, where=f"{where}[{k!r}]")
        return x
    raise InputDataError(f"{where} must be a tensor (or a tuple/dict of tensors), got {type(x).__name__}")


def check_class_targets(y: Any, num_classes: int, *, where: str = "targets") -> None:
    """Class-index targets for a ``(batch, num_classes)`` output: integers in ``[0, num_classes)``."""
    if not isinstance(y, torch.Tensor):
        raise InputDataError(f"{where} must be a tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool:
        return  # soft targets or a custom loss: not class indices
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputDataError(f"{where} hold class {int(y.min()) if int(y.min()) < 0 else int(y.max())}, but the model "
                             f"has {num_classes} outputs (classes 0..{num_classes - 1})")


def shape_of(x: Any) -> str:
    """The shapes in ``x`` for a message: ``(4, 1, 28, 28)``, or nested for tuples and dicts of tensors."""
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(shape_of(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {shape_of(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def split_batch(batch: Any, *, where: str = "batch", model: Any = None) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch that is such a pair (a list or tuple of two), or a dict batch with
    ``labels`` as Hugging Face collators produce it (``{"input_ids", "attention_mask", "labels"}``), its padding
    checked against ``model``'s pad id where it has one."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        inputs, targets = split_mapping_batch(batch, pad_token_id_of(model))
        if targets is None:
            raise InputDataError(f"each {where} dict needs its targets under 'labels'; got keys {sorted(batch)}")
        return inputs, targets
    raise InputDataError(f"each {where} must be an (inputs, targets) pair, got "
                         f"{type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")


def reiterable(data: Iterable, *, what: str = "data") -> Iterable:
    """``data`` when it can be iterated more than once; a one-shot iterator is refused.

    Stages read their batches more than once (calibration, several passes, several stages),
    so an iterator would silently give each pass different batches.
    """
    if isinstance(data, Iterator) or (hasattr(data, "__next__") and iter(data) is data):
        raise InputDataError(f"{what} is a one-shot iterator ({type(data).__name__}): each stage would see different "
                             "batches. Pass a list of batches (list(it)) or a DataLoader, which can be iterated again")
    if not isinstance(data, Iterable):
        raise InputDataError(f"{what} must be an iterable of batches, got {type(data).__name__}")
    return data


def check_int(value: Any, name: str, *, low: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as an int (at least ``low``); a float, string or bool is refused rather than silently truncated."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        bound = f" >= {low}" if low is not None else ""
        raise ConfigTypeError(f"{name} must be an integer{bound}{' or None' if allow_none else ''}, "
                              f"got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` when it is True or False; 1, "yes" or None are refused rather than read as truthy."""
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_number(value: Any, name: str, *, low: float | None = None, strict: bool = False,
                 allow_none: bool = False) -> float | None:
    """``value`` as a finite float, at least ``low`` (above it when ``strict``)."""
    if value is None and allow_none:
        return None
    bound = f" {'>' if strict else '>='} {low:g}" if low is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(f"{name} must be a finite number{bound}, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or (low is not None and (v < low or (strict and v == low))):
        raise ConfigError(f"{name} must be a finite number{bound}, got {value}")
    return v
