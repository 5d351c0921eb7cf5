"""Uniform quantization of tensors: the formulas, with the straight-through estimator.

Weights are symmetric and signed: s = max|W| / (2^(b-1) - 1), q in [-(2^(b-1)-1), 2^(b-1)-1].
Activations are symmetric with zero-point 0: unsigned (q in [0, 2^b - 1], s = max / (2^b - 1))
when they are never negative (after ReLU), signed otherwise. A zero-point of 0 keeps the
integer path a plain multiply-accumulate.
"""

from __future__ import annotations

from typing import Literal

import torch

from hessq._errors import ConfigError

Granularity = Literal["tensor", "channel", "group", "block"]
GRANULARITIES = ("tensor", "channel", "group", "block")

WEIGHT_BITS = range(2, 9)
ACT_BITS = (4, 8, 16)

# Scales never fall below this, so an all-zero channel quantizes to zeros rather than NaN.
_MIN_SCALE = 1e-12


def check_weight_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise ConfigError(f"weight bit width must be an integer from 2 to 8, got {bits!r}")
    return bits


def check_act_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in ACT_BITS:
        raise ConfigError(f"activation bit width must be one of {ACT_BITS}, got {bits!r}")
    return bits


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code: symmetric [-(2^(b-1)-1), 2^(b-1)-1] or [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) forwards; identity gradient backwards."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """clamp(round(x / s), qmin, qmax) * s with the straight-through estimator.

    The gradient is 1 where x / s lies inside [qmin, qmax] and 0 where it is clamped.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return torch.clamp(round_ste(x / scale), qmin, qmax) * scale
    # No graph to keep (evaluation, calibration): the same numbers in one buffer, since round_ste's forward
    # x + (round(x) - x) is round(x) exactly in floating point. Four passes instead of six, and one allocation.
    return (x / scale).round_().clamp_(qmin, qmax).mul_(scale)


def group_view(x: torch.Tensor, axis: int, num_groups: int) -> torch.Tensor:
    """``x`` reshaped to (num_groups, -1) with ``axis`` split into ``num_groups`` contiguous groups."""
    size = x.shape[axis]
    if num_groups < 1 or size % num_groups:
        raise ConfigError(f"cannot split dimension {axis} of size {size} into {num_groups} equal groups")
    moved = x.movedim(axis, 0)
    return moved.reshape(num_groups, -1)


def check_granularity(granularity: str, num_groups: int = 1, block_size: int = 128) -> None:
    """Refuse an unknown granularity, a group count or a block size that is not a positive integer."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    for name, v in (("num_groups", num_groups), ("block_size", block_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def block_view(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` as (rows, blocks, block_size): each output row (dim 0) cut along its flattened input dimension into
    blocks of ``block_size`` columns, the last block zero-padded when the width is not a multiple."""
    flat = x.flatten(1)
    blocks = -(-flat.shape[1] // block_size)
    flat = torch.nn.functional.pad(flat, (0, blocks * block_size - flat.shape[1]))
    return flat.reshape(flat.shape[0], blocks, block_size)


def expand_blocks(scale: torch.Tensor, like: torch.Tensor, block_size: int) -> torch.Tensor:
    """A per-(row, block) scale [O, B] broadcast to ``like`` (each block's scale repeated over its columns)."""
    width = like[0].numel()
    return scale.repeat_interleave(block_size, dim=1)[:, :width].reshape(like.shape)


def reduce_absmax(x: torch.Tensor, granularity: Granularity = "tensor", axis: int = 0, num_groups: int = 1,
                  block_size: int = 128) -> torch.Tensor:
    """max |x| per tensor (shape []), per slice along ``axis`` (shape [C]), per group (shape [G]), or per block
    of ``block_size`` input columns of each output row (shape [O, B]; ``axis`` 0 only)."""
    if granularity == "tensor":
        return x.detach().abs().amax()
    if granularity == "block":
        return block_view(x.detach().abs(), block_size).amax(dim=2)
    if granularity == "channel":
        num_groups = x.shape[axis]
    elif granularity != "group":
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return group_view(x.detach().abs(), axis, num_groups).amax(dim=1)


def expand_scale(scale: torch.Tensor, like: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Broadcast a per-group scale [G] to ``like`` along ``axis`` (each group repeated over its slices)."""
    if scale.dim() == 0:
        return scale
    size = like.shape[axis]
    per = size // scale.numel()
    full = scale.repeat_interleave(per)
    shape = [1] * like.dim()
    shape[axis] = size
    return full.reshape(shape)


def symmetric_scale(absmax: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """s = absmax / qmax, floored at a tiny positive value."""
    _, qmax = qrange(bits, signed)
    return torch.clamp(absmax / qmax, min=_MIN_SCALE)


#: Clip ratios (of max |w|) that :func:`least_squares_clip` tries: 1, 0.96, ..., 0.08.
CLIP_RATIOS = tuple(1 - k / 25 for k in range(24))


@torch.no_grad()
def least_squares_clip(rows: torch.Tensor, absmax: torch.Tensor, bits: int, unit: torch.Tensor | None = None) -> torch.Tensor:
    """The clip ratio r of each unit (a row, or a group of rows) whose symmetric scale r·max|w| / qmax rounds the
    unit with the least squared error.

    ``rows`` [R, D] are the values, ``absmax`` [U] each unit's max |w| and ``unit`` [R] the unit of each row
    (None: one unit per row). Every ratio in :data:`CLIP_RATIOS` is tried, 1 (no clipping) included, so the error
    is never above that of the max |w| scale. At 2 bits a max |w| scale rounds most of a row to 0 (its levels are
    0 and ±max|w|); the best clip keeps the row's shape.
    """
    qmin, qmax = qrange(bits, signed=True)
    rows = rows.detach().float()
    absmax = absmax.detach().float()
    index = unit if unit is not None else torch.arange(rows.shape[0], device=rows.device)
    best_err = best_ratio = None
    for ratio in CLIP_RATIOS:
        s = symmetric_scale(absmax * ratio, bits)[index].unsqueeze(1)
        err_rows = (torch.clamp(torch.round(rows / s), qmin, qmax) * s - rows).pow(2).sum(1)
        err = err_rows if unit is None else torch.zeros_like(absmax).index_add_(0, index, err_rows)
        if best_err is None:
            best_err, best_ratio = err, torch.ones_like(err)
        else:  # strictly better only: a tie keeps the wider range
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(err, ratio), best_ratio)
    return best_ratio


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    granularity: Granularity = "channel",
    num_groups: int = 1,
    axis: int = 0,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric signed quantization of a weight tensor.

    Returns ``(q, scale)``: ``q`` holds the integer codes (as a float tensor of whole
    numbers, broadcast-compatible with ``weight``) and ``scale`` is per tensor ([]),
    per output channel ([C]), per group of output rows ([G]) — Q-BERT's group-wise scheme — or per block
    of ``block_size`` input columns of each output row ([O, B], GPTQ/AWQ-style).
    ``q * weight_scale_like(scale, weight, ...)`` is the dequantized weight.
    """
    check_weight_bits(bits)
    scale = symmetric_scale(reduce_absmax(weight, granularity, axis, num_groups, block_size), bits)
    qmin, qmax = qrange(bits, signed=True)
    q = torch.clamp(torch.round(weight.detach() / weight_scale_like(scale, weight, axis, block_size)), qmin, qmax)
    return q, scale


def weight_scale_like(scale: torch.Tensor, weight: torch.Tensor, axis: int = 0, block_size: int = 128) -> torch.Tensor:
    """A weight scale of any granularity broadcast against ``weight`` (a 2-D [O, B] scale is per block)."""
    return expand_blocks(scale, weight, block_size) if scale.dim() == 2 else expand_scale(scale, weight, axis)


def fake_quantize_weight(
    weight: torch.Tensor,
    bits: int,
    granularity: Granularity = "channel",
    num_groups: int = 1,
    axis: int = 0,
    block_size: int = 128,
) -> torch.Tensor:
    """Q_b(W): the dequantized weight, differentiable through the straight-through estimator."""
    check_weight_bits(bits)
    scale = symmetric_scale(reduce_absmax(weight, granularity, axis, num_groups, block_size), bits)
    qmin, qmax = qrange(bits, signed=True)
    return fake_quantize(weight, weight_scale_like(scale, weight, axis, block_size), qmin, qmax)


def quantization_error(weight: torch.Tensor, bits: int, granularity: Granularity = "channel", num_groups: int = 1,
                       block_size: int = 128) -> float:
    """‖Q_b(W) − W‖², the squared error HAWQ-V2/V3's perturbation Ω multiplies by Tr(H)/n."""
    with torch.no_grad():
        return float((fake_quantize_weight(weight, bits, granularity, num_groups, block_size=block_size) - weight).pow(2).sum())
