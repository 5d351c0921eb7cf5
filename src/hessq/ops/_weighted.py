"""What every weighted op family shares: the quantized-layer base module and the accumulator arithmetic.

A twin quantizes its weight (per output channel by default) and its bias to int32 at scale
S_w·S_in, where S_in is the scale of the activation quantizer that feeds it: the integer model
accumulates exactly this sum. A family subclasses :class:`WeightedOp` and says how its
accumulator is computed (:meth:`WeightedOp.accumulate`) and exported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hessq.ops._program import Value, channel
from hessq._errors import ConfigError
from hessq.ops._registry import IntegerConversionError, QuantOp
from hessq.quantizer import ActQuantizer, WeightQuantizer, choose_kernel, expand_scale, qrange, round_ste

INT32_MAX = 2**31 - 1
#: Largest |weight code| whose pairs of uint8 × int8 products fit 16 bits (2·255·64 < 2^15). ONNX Runtime's
#: uint8 × int8 kernels saturate such pairs on AVX2 CPUs without VNNI (VPMADDUBSW), so wider weights (every 8-bit
#: layer) run as uint8 around :data:`WEIGHT_ZERO_POINT` (:func:`uint8_weights`), whose kernels are exact on every x86 CPU.
SATURATION_FREE = 64
WEIGHT_ZERO_POINT = 128


def saturates(codes: Any) -> bool:
    """Whether int8 weight ``codes`` can saturate a uint8 × int8 kernel's 16-bit pair sums."""
    codes = np.asarray(codes)
    return bool(codes.size) and int(np.abs(codes).max()) > SATURATION_FREE


def uint8_weights(codes: Any) -> np.ndarray:
    """int8 weight codes as uint8 around :data:`WEIGHT_ZERO_POINT` (the same values, for uint8 × uint8 kernels)."""
    return (np.asarray(codes).astype(np.int16) + WEIGHT_ZERO_POINT).astype(np.uint8)


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with the straight-through estimator, in place where no gradient is recorded."""
    return round_ste(x) if torch.is_grad_enabled() and x.requires_grad else x.round_()


class WeightCodes:
    """A weight quantizer, the input's activation quantizer and an int32 bias (a mixin for an ``nn.Module``
    with ``weight`` and ``bias``): what a quantized twin and any module with integer weights share."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_quant(self, w_bits: int, a_bits: int, granularity: str, num_groups: int) -> None:
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

    def _calibrated_input(self) -> ActQuantizer | None:
        """The input's activation quantizer once it has a scale (None before calibration, or without one)."""
        q_in = self.act_quantizer
        return None if q_in is None or q_in.observing or not bool(q_in.calibrated) else q_in

    @staticmethod
    def _input_scale(q_in: ActQuantizer) -> torch.Tensor:
        # the input scale as of this call: a layer run more than once in a forward (ALBERT's shared layers) has its
        # input quantizer track each call's range in place, which the earlier calls' backward must not see
        return q_in.scale.clone()

    def _bias_codes(self, out_scale: torch.Tensor) -> torch.Tensor:
        """The bias on the int32 grid of the accumulator's scale S_w·S_in, straight through."""
        return torch.clamp(_round(self.bias / out_scale), -INT32_MAX, INT32_MAX)

    def quantized_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w_q = self.weight_quantizer(self.weight)
        q_in = self._calibrated_input()
        if self.bias is None or q_in is None:
            return w_q, self.bias
        wq = self.weight_quantizer
        bias_scale = wq.row_scale(wq.scale(self.weight), self.bias.shape[0]) * self._input_scale(q_in)
        return w_q, self._bias_codes(bias_scale) * bias_scale

    def integer_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """(input codes, weight codes, bias codes or None, one scale per output row) of this layer on ``x``, the
        codes as floats with the straight-through estimator, or None where the products share no scale per output
        row (one scale per block of input columns) or the input quantizer is not calibrated yet.

        The twins' training forward sums these codes and scales the sum once: ``(Σ c_x·c_w + c_b)·S_in·S_w``.
        Integer products summed in floating point are exact (below 2^24 in float32), so an output is the same
        whatever the batch split, the thread count or the summation order, and an accumulator the integer model
        gives 0 is exactly 0: were it summed from the scaled values instead, it would be ±1e-17 rounding noise, and
        the ReLU after it would pass or stop its gradient by that noise (two ranks of a QAT run then part at a
        random step).
        """
        q_in = self._calibrated_input()
        wq = self.weight_quantizer
        w_scale = wq.scale(self.weight)
        if q_in is None or w_scale.dim() == 2:
            return None
        qmin, qmax = wq.code_bounds(self.weight)
        w_codes = torch.clamp(_round(self.weight / wq.expand(w_scale, self.weight)), qmin, qmax)
        s_in = self._input_scale(q_in)
        out_scale = wq.row_scale(w_scale, self.weight.shape[0]) * s_in
        b_codes = None if self.bias is None else self._bias_codes(out_scale)
        return _round(x / s_in), w_codes, b_codes, out_scale

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 codes, float64 scale per channel / group / tensor) of the quantized weight."""
        wq = self.weight_quantizer
        scale = wq.scale(self.weight).double()
        lo, hi = wq.code_bounds(self.weight)
        codes = torch.clamp(torch.round(self.weight.double() / wq.expand(scale, self.weight)), lo, hi)
        return codes.to(torch.int64), scale

    @torch.no_grad()
    def integer_bias(self, input_scale: torch.Tensor) -> torch.Tensor | None:
        """int32-range codes of the bias at scale S_w·S_in (as int64), or None without bias."""
        if self.bias is None:
            return None
        _, w_scale = self.integer_weight()
        bias_scale = self.weight_quantizer.row_scale(w_scale, self.bias.shape[0]) * input_scale.double()
        return torch.clamp(torch.round(self.bias.double() / bias_scale), -INT32_MAX, INT32_MAX).to(torch.int64)


class QuantLayer(WeightCodes, nn.Module):
    """Base of the quantized twins (quantizable layers with their own bits in a plan)."""


class WeightedOp(QuantOp):
    """A family of quantizable layers: y = bias + Σ w·x, accumulated exactly in integers."""

    weighted = True
    #: The quantized twin class: ``twin(module, w_bits, a_bits, granularity, num_groups)``.
    twin: type[QuantLayer]
    #: The dimension of the output channels (per-channel scales and bias): 1 (NCHW), or -1 (the last: Linear)
    channel_dim: int = 1
    #: Shares its bits with the other layers whose outputs meet at the same residual add (HAWQ-V3's ties).
    tied_at_add: bool = True

    def per_channel(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-output-channel [C] tensor shaped to broadcast on :attr:`channel_dim` of an ``ndim`` tensor."""
        return channel(t, ndim) if self.channel_dim == 1 else t

    def matches(self, node, modules):
        # the float layer and, after the rewrite, its quantized twin
        return node.op == "call_module" and isinstance(modules.get(node.target), (*self.modules, self.twin))

    def quantized_module(self, module, w_bits, a_bits, granularity, num_groups, block_size: int = 128):
        # at most num_groups groups: a layer with fewer rows (a 2-class head among 384-row matrices) gets one per row
        num_groups = min(num_groups, module.weight.shape[0]) if granularity == "group" else num_groups
        if granularity == "group" and module.weight.shape[0] % num_groups:
            raise ConfigError(f"cannot split the {module.weight.shape[0]} output rows of a {type(module).__name__} into "
                              f"{num_groups} equal groups; choose num_groups dividing every layer's rows, or another granularity")
        twin = self.twin(module, w_bits, a_bits, granularity if granularity != "block" else "channel", num_groups)
        if granularity == "block":  # the twins' constructors take no block size: their quantizer is replaced
            twin.weight_quantizer = WeightQuantizer(w_bits, "block", block_size=block_size)
        return twin

    def weight_quantizer(self, bits: int, granularity: str = "channel", num_groups: int = 1,
                         block_size: int = 128) -> WeightQuantizer:
        """A quantizer of this family's weights, as its twins hold them: what Ω and ZeroQ's KL measure."""
        return WeightQuantizer(bits, granularity, num_groups, block_size)

    def macs(self, module, inputs, output):
        # each output element is one dot product over a weight row: (in/groups)·kh·kw for a conv
        return output.numel() * module.weight[0].numel()

    # -- what a family says ----------------------------------------------------------------------------
    def layer_attrs(self, m: QuantLayer) -> dict[str, Any]:
        """The program op's attributes besides w_bits, kernel and bound (stride, padding, ...)."""
        return {}

    def accumulate(self, x: torch.Tensor, w: torch.Tensor, attrs: dict[str, Any], kernel: str) -> torch.Tensor:
        """int64 accumulators of int64 codes ``x`` and ``w`` (without bias), with the exact ``kernel``."""
        raise NotImplementedError

    # -- shared arithmetic ----------------------------------------------------------------------------------
    def compile(self, program, node, m, args, kwargs):
        v: Value = args[0]
        q_in = m.act_quantizer
        if v.scale is None or q_in is None or v.scale.dim() or float(v.scale) != float(q_in.scale.double()):
            raise IntegerConversionError(f"internal: input of `{node.target}` is not on its quantizer's grid")
        return self.emit_accumulator(program, node.name, m, v, self.kinds[0])

    def emit_accumulator(self, program, name: str, m: WeightCodes, v: Value, kind: str) -> Value:
        """Emit the op ``kind`` writing ``name``: the int64 accumulator (bias included) of ``m`` on the codes ``v``."""
        w, s_w = m.integer_weight()
        if s_w.dim() == 2:
            raise IntegerConversionError(
                f"`{name}` has one weight scale per block of input columns (granularity='block'): its products have "
                "no single integer accumulator per output. Evaluate it in float fake quantization (the quantized model "
                "does so in eval mode), or quantize per channel or in row groups for an integer model")
        bias = m.integer_bias(v.scale)
        bound = int(w.abs().flatten(1).sum(1).max()) * v.qmax + (int(bias.abs().max()) if bias is not None else 0)
        tensors = {"weight": w.to(torch.int8)}
        if bias is not None:
            tensors["bias"] = bias.to(torch.int32)
        attrs = {"w_bits": m.w_bits, "kernel": choose_kernel(bound), "bound": bound, **self.layer_attrs(m)}
        dummy = self.accumulate(v.dummy.to(torch.int64), w, attrs, "float64")
        acc_scale = expand_scale(s_w, torch.empty(w.shape[0]), 0) * v.scale
        return program.emit(name, kind, [v], dummy, self.per_channel(acc_scale, dummy.dim()), bound, attrs, tensors)

    def execute(self, op, inputs, kernel):
        chosen = "int64" if kernel == "int64" else op.attrs["kernel"]
        acc = self.accumulate(inputs[0], op.tensors["weight"].to(torch.int64), op.attrs, chosen)
        if "bias" in op.tensors:
            acc = acc + self.per_channel(op.tensors["bias"].to(torch.int64), acc.dim())
        return acc
