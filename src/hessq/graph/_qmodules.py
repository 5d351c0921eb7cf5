"""Quantized twins of Conv2d and Linear, and the quantized residual add.

A twin quantizes its weight (per output channel by default) and its bias to int32 at
scale S_w·S_in, where S_in is the scale of the activation quantizer that feeds it: the
integer model accumulates exactly this sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.quantizer import ActQuantizer, WeightQuantizer, expand_scale, qrange, round_ste
from hessq.quantizer._functional import Granularity

INT32_MAX = 2**31 - 1


class _QuantLayer(nn.Module):
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_quant(self, w_bits: int, a_bits: int, granularity: Granularity, num_groups: int) -> None:
        self.weight_quantizer = WeightQuantizer(w_bits, granularity, num_groups)
        self.a_bits = a_bits
        self._input_quantizer: tuple[ActQuantizer, ...] = ()

    @property
    def w_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def act_quantizer(self) -> ActQuantizer | None:
        """The activation quantizer whose scale the input arrives at (possibly shared)."""
        return self._input_quantizer[0] if self._input_quantizer else None

    def set_input_quantizer(self, quantizer: ActQuantizer) -> None:
        # A plain tuple, not a submodule: the quantizer is owned elsewhere and may be shared.
        self._input_quantizer = (quantizer,)

    def quantized_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w_q = self.weight_quantizer(self.weight)
        if self.bias is None:
            return w_q, None
        q_in = self.act_quantizer
        if q_in is None or q_in.observing or not bool(q_in.calibrated):
            return w_q, self.bias
        bias_scale = expand_scale(self.weight_quantizer.scale(self.weight), self.bias, axis=0) * q_in.scale
        b_q = torch.clamp(round_ste(self.bias / bias_scale), -INT32_MAX, INT32_MAX) * bias_scale
        return w_q, b_q


    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 codes, float64 scale per channel / group / tensor) of the quantized weight."""
        wq = self.weight_quantizer
        scale = wq.scale(self.weight).double()
        lo, hi = qrange(wq.bits, signed=True)
        codes = torch.clamp(torch.round(self.weight.double() / expand_scale(scale, self.weight, 0)), lo, hi)
        return codes.to(torch.int64), scale

    @torch.no_grad()
    def integer_bias(self, input_scale: torch.Tensor) -> torch.Tensor | None:
        """int32-range codes of the bias at scale S_w·S_in (as int64), or None without bias."""
        if self.bias is None:
            return None
        _, w_scale = self.integer_weight()
        bias_scale = expand_scale(w_scale, self.bias, 0) * input_scale.double()
        return torch.clamp(torch.round(self.bias.double() / bias_scale), -INT32_MAX, INT32_MAX).to(torch.int64)


class QuantConv2d(_QuantLayer):
    """Conv2d (any stride, padding, dilation, groups) with quantized weight and int32-grid bias."""

    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int, granularity: Granularity = "channel", num_groups: int = 1) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ConfigError(f"only zero padding is supported, got padding_mode={conv.padding_mode!r}")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self._init_quant(w_bits, a_bits, granularity, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight_and_bias()
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, w_bits={self.w_bits}, a_bits={self.a_bits}"
        )


class QuantLinear(_QuantLayer):
    """Linear with quantized weight and int32-grid bias."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, granularity: Granularity = "channel", num_groups: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self._init_quant(w_bits, a_bits, granularity, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight_and_bias()
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}"


class QuantAdd(nn.Module):
    """Residual add: each branch is rounded onto the output grid, then the codes are added and clamped.

    This is what the integer model does (each branch requantized by its own dyadic
    number, added in int32, clamped), so both compute the same thing.
    """

    def __init__(self, quantizer: ActQuantizer) -> None:
        super().__init__()
        self.output_quantizer = quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        q = self.output_quantizer
        if q.observing:
            return q(a + b)
        if not bool(q.calibrated):
            q(a)  # raises the "never calibrated" error
        if self.training and q.ema_in_training:
            q._track(a + b)
        codes = torch.clamp(round_ste(a / q.scale) + round_ste(b / q.scale), q.qmin, q.qmax)
        return codes * q.scale


class QuantCat(nn.Module):
    """Concatenation: each input is rounded onto the one output grid, then joined."""

    def __init__(self, quantizer: ActQuantizer, dim: int = 0) -> None:
        super().__init__()
        self.output_quantizer = quantizer
        self.dim = dim

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        q = self.output_quantizer
        if q.observing:
            return q(torch.cat(tensors, self.dim))
        if not bool(q.calibrated):
            q(tensors[0])  # raises the "never calibrated" error
        if self.training and q.ema_in_training:
            q._track(torch.cat(tensors, self.dim))
        return torch.cat([torch.clamp(round_ste(t / q.scale), q.qmin, q.qmax) * q.scale for t in tensors], self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear)
