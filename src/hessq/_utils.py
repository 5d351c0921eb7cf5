"""Small helpers every stage shares: the model's device, a mode switch that restores itself, batch inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
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


def pad_token_id_of(model: Any) -> int | None:
    """The token id ``model`` pads with: a captured or quantized text model's ``pad_token_id``, an integer model's
    recorded one, or a Hugging Face model's ``config.pad_token_id`` (0 where unset, as hessq's capture reads it);
    None for a model that reads no token ids."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    pad = getattr(model, "pad_token_id", None)
    if pad is None and isinstance(getattr(model, "meta", None), Mapping):
        pad = model.meta.get("pad_token_id")
    config = getattr(model, "config", None)
    if pad is None and config is not None and hasattr(config, "pad_token_id") and hasattr(config, "vocab_size"):
        pad = config.pad_token_id if config.pad_token_id is not None else 0
    return None if pad is None or isinstance(pad, bool) else int(pad)


#: Keys of a Hugging Face batch dict that hold targets rather than inputs.
TARGET_KEYS = ("labels", "label")
_TOKEN_KEYS = {"input_ids", "attention_mask", "token_type_ids"}


def token_ids(batch: Mapping[str, Any], pad_token_id: int | None = None) -> torch.Tensor:
    """The ``input_ids`` of a Hugging Face batch dict, after checking that the rest says nothing more.

    A captured Hugging Face model reads the token ids alone and derives its attention mask from the
    padding, so the batch's ``attention_mask`` must be exactly ``input_ids != pad`` (what tokenizers
    and collators produce) and its ``token_type_ids``, if any, all zero (single-sentence tasks). Given the model's
    ``pad_token_id``, the padding the mask marks must be that id: a model that finds its padding by its own id would
    otherwise attend to these tokens as text.
    """
    from hessq._errors import InputDataError

    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise InputDataError(f"input_ids must be an int64 tensor of token ids, got {getattr(ids, 'dtype', type(ids).__name__)}")
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask).bool()
        if mask.shape != ids.shape:
            raise InputDataError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        padded = ids[~mask]
        if padded.numel() and ((padded != padded[0]).any() or (ids[mask] == padded[0]).any()):
            raise InputDataError(
                "attention_mask is not the padding of input_ids: hessq derives the mask from the pad token "
                "(input_ids != pad_token_id), as tokenizers produce it. Mask only padding tokens, and pad with "
                "the model's pad_token_id")
        if padded.numel() and pad_token_id is not None and int(padded[0]) != int(pad_token_id):
            raise InputDataError(
                f"the batch pads with id {int(padded[0])} but the model's pad_token_id is {int(pad_token_id)}: hessq "
                f"finds the padding by the model's id, so it would read these pads as text. Pad with "
                f"{int(pad_token_id)} (the model's own tokenizer: tokenizer.pad_token_id), or set the model's "
                f"config.pad_token_id to the id its tokenizer pads with")
    types = batch.get("token_type_ids")
    if types is not None and bool(torch.as_tensor(types).any()):
        raise InputDataError("token_type_ids are not all zero: sentence-pair inputs are not supported yet; "
                             "classify single texts, or drop token_type_ids")
    return ids


def split_mapping_batch(batch: Mapping[str, Any], pad_token_id: int | None = None) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a dict batch: the token ids of a Hugging Face batch (see :func:`token_ids`; checked
    against the model's ``pad_token_id`` where given), or every other key as a dict of inputs; the targets are
    ``labels`` (None without)."""
    targets = next((batch[k] for k in TARGET_KEYS if k in batch), None)
    inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    if "input_ids" in inputs and set(inputs) <= _TOKEN_KEYS:
        return token_ids(inputs, pad_token_id), targets
    return inputs, targets


def batch_inputs(batch: Any, pad_token_id: int | None = None) -> Any:
    """The inputs of a batch: the first item of an ``(inputs, targets)`` pair, the inputs of a dict batch
    (:func:`split_mapping_batch`, its padding checked against ``pad_token_id``), or the batch itself."""
    if isinstance(batch, Mapping):
        return split_mapping_batch(batch, pad_token_id)[0]
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
