"""Linear: quantized twin, integer accumulator (x @ Wᵀ), ONNX MatMulInteger."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessq.ops._registry import register
from hessq.ops._weighted import QuantLayer, WeightedOp
from hessq.quantizer import integer_linear


class QuantLinear(QuantLayer):
    """Linear with quantized weight and int32-grid bias."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, granularity: str = "channel", num_groups: int = 1) -> None:
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


@register
class Linear(WeightedOp):
    name = "linear"
    modules = (nn.Linear,)
    kinds = ("linear",)
    twin = QuantLinear
    channel_dim = -1  # any leading dimensions (tokens, channels-last pixels): the features are the last

    def accumulate(self, x, w, attrs, kernel):
        return integer_linear(x, w, kernel)

    def onnx(self, ex, op, ins):
        x = ex.as_codes_input(ins[0])
        wt = ex.const("wT", op.tensors["weight"].numpy().astype(np.int8).T.copy())
        acc = ex.node("MatMulInteger", [x.name, wt, ex.const("x_zp", np.uint8(x.zero_point))], "matmulint")
        return ex.accumulator(op, acc)

    def latency_models(self, op, input_shape):
        wt = op.tensors["weight"].numpy().astype(np.int8).T.copy()
        return (
            ("MatMulInteger", ["x", "w", "xz"], {}, {"w": wt, "xz": np.uint8(0)}, "int32"),
            ("MatMul", ["x", "w"], {}, {"w": wt.astype(np.float32)}, "float32"),
        )
