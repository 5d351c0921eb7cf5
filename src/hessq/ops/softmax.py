"""Softmax over the last dimension, with an optional keep-mask (attention)."""

from __future__ import annotations

import torch


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """``softmax(scores)`` over ``dim`` where only positions with ``keep`` True take part (padding gets 0).

    The attention form of softmax: a masked position contributes exp(-inf) = 0, as in Hugging Face's
    additive mask of the dtype's smallest value. A row with nothing kept gives zeros rather than NaN.
    """
    if keep is None:
        return torch.softmax(scores, dim)
    filled = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim) * keep
