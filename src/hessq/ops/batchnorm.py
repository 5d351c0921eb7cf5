"""A BatchNorm that does not fold into a conv before it (DenseNet's BN-ReLU-Conv): an integer per-channel affine.

In eval mode BatchNorm is y = x·γ/σ + (β − μ·γ/σ) per channel, which is a depthwise 1×1 convolution. The module
quantizes its input onto a grid of its own, its per-channel factor to 8-bit weight codes and its shift to int32 at
scale S_w·S_in, and puts the result on an output grid; the integer program runs it as a ``channel_affine`` op with
the conv's arithmetic, executor and ONNX emission (ConvInteger, or QLinearConv in the fast export).
"""

from __future__ import annotations


import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.ops._registry import QuantOp, family_for_kind, register
from hessq.ops._weighted import WeightCodes
from hessq.ops.quant import to_grid
from hessq.quantizer import ActQuantizer

#: Bits of the per-channel factor's codes (the quantizer's widest weight width).
AFFINE_WEIGHT_BITS = 8


class QuantBatchNorm2d(WeightCodes, nn.Module):
    """Fake-quant standalone BatchNorm2d: q_out(q_in(x)·w_q + b_q), w = γ/σ per channel as a depthwise 1×1 conv."""

    stride, padding, dilation = (1, 1), (0, 0), (1, 1)

    def __init__(self, bn: nn.BatchNorm2d, input_quantizer: ActQuantizer, output_quantizer: ActQuantizer) -> None:
        super().__init__()
        if not bn.track_running_stats or bn.running_mean is None:
            raise ConfigError("a BatchNorm without running statistics (track_running_stats=False) has no integer form")
        with torch.no_grad():
            gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
            beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            factor = gamma / torch.sqrt(bn.running_var + bn.eps)
            self.weight = nn.Parameter(factor.detach().clone().reshape(-1, 1, 1, 1))
            self.bias = nn.Parameter((beta - bn.running_mean * factor).detach().clone())
        self.groups = self.weight.shape[0]
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer
        self._init_quant(AFFINE_WEIGHT_BITS, input_quantizer.bits, "channel", 1)
        self.set_input_quantizer(input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight_and_bias()
        return self.output_quantizer(F.conv2d(self.input_quantizer(x), w, b, groups=self.groups))

    def extra_repr(self) -> str:
        return f"{self.groups}, w_bits={self.w_bits}"


@register
class BatchNorm2d(QuantOp):
    name = "batchnorm2d"
    modules = (nn.BatchNorm2d, QuantBatchNorm2d)
    kinds = ("channel_affine",)

    def requantizing_module(self, node, new_quantizer):
        bn = node.graph.owning_module.get_submodule(node.target)
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(node.args[0], fx.Node):
            return None
        return QuantBatchNorm2d(bn, new_quantizer(), new_quantizer()), (node.args[0],)

    def compile(self, program, node, m, args, kwargs):
        if not isinstance(m, QuantBatchNorm2d):
            program.fail(node, "a BatchNorm2d on a float input")
        v = to_grid(program, f"{node.name}_in", args[0], m.input_quantizer)
        acc = family_for_kind("conv2d").emit_accumulator(program, f"{node.name}_affine", m, v, "channel_affine")
        return to_grid(program, node.name, acc, m.output_quantizer)

    # the arithmetic and its export are the depthwise conv's
    def execute(self, op, inputs, kernel):
        return family_for_kind("conv2d").execute(op, inputs, kernel)

    def onnx(self, ex, op, ins):
        return family_for_kind("conv2d").onnx(ex, op, ins)

    def onnx_fast(self, ex, op, ins):
        return family_for_kind("conv2d").onnx_fast(ex, op, ins)


