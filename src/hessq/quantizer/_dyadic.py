"""Dyadic numbers b / 2^c: how an integer-only model multiplies by a real scale (HAWQ-V3).

A requantization by the real factor m = S_in / S_out becomes an integer multiply by b,
an add of 2^(c-1) and an arithmetic right shift by c, i.e. round-half-up of acc·m.
"""

from __future__ import annotations

import torch

from hessq._errors import ConfigError, ConfigTypeError

#: b uses at most 31 bits, so acc·b fits in int64 for any |acc| < 2^32.
DYADIC_BITS = 31
_MAX_SHIFT = 62


def dyadic(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (b, c), elementwise, with b / 2^c ≈ m, 2^30 ≤ b < 2^31 where c allows.

    ``m`` must be positive and finite; it is read as float64. The relative error is
    below 2^-30.
    """
    m = torch.as_tensor(m, dtype=torch.float64)
    if not torch.isfinite(m).all() or (m <= 0).any():
        raise ConfigError("a dyadic multiplier must be positive and finite; a scale is zero, negative or NaN")
    _, exponent = torch.frexp(m)  # m = mantissa · 2^exponent, mantissa in [0.5, 1)
    c = (DYADIC_BITS - exponent.to(torch.int64)).clamp(0, _MAX_SHIFT)
    b = torch.round(torch.ldexp(m, c)).to(torch.int64)
    # rounding can carry into bit 31: halve once more
    over = b >= 2**DYADIC_BITS
    if over.any():
        c = torch.where(over & (c > 0), c - 1, c)
        b = torch.round(torch.ldexp(m, c)).to(torch.int64)
    if (b >= 2**DYADIC_BITS).any():
        raise ConfigError(f"a requantization factor of {float(m.max()):.3g} is too large for a 31-bit dyadic number")
    return b, c


def dyadic_value(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """b / 2^c as float64 (for reports and tests)."""
    return torch.ldexp(b.to(torch.float64), -c)


def requantize(acc: torch.Tensor, b: torch.Tensor, c: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """clamp((acc·b + 2^(c−1)) >> c, qmin, qmax) in int64: integer multiply, add, arithmetic shift.

    ``acc`` is an int64 tensor; ``b`` and ``c`` broadcast against it (per tensor or per channel).
    """
    if acc.dtype != torch.int64:
        raise ConfigTypeError(f"requantize expects int64 accumulators, got {acc.dtype}")
    half = torch.where(c > 0, torch.ones_like(c) << (c - 1).clamp(min=0), torch.zeros_like(c))
    # one fresh tensor, then shifted and clamped in place: a third of the time of fresh tensors per step
    y = torch.addcmul(half, acc, b)
    return y.bitwise_right_shift_(c).clamp_(qmin, qmax)
