"""Linear: quantized twin, integer accumulator (x @ Wᵀ), ONNX MatMulInteger.

The fast ONNX export runs an 8-bit layer as ONNX Runtime's MatMulIntegerToFloat (uint8 codes at the input's static
scale × int8 weights with one scale per output row, int32 accumulation, then scale and float bias in the same kernel),
and a layer of at most 4-bit weights as MatMulNBits (the codes packed two per byte with ONNX Runtime's default zero
point 8, the row's scale repeated over its blocks of ``NBITS_BLOCK`` input columns, ``accuracy_level=4``: the float
input is quantized to int8 per block inside the kernel). Both give real values; the requantize after them puts those
on the next grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessq.ops._registry import register
from hessq.ops._weighted import WEIGHT_ZERO_POINT, QuantLayer, WeightedOp, uint8_weights
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
        exact = self.integer_operands(x)
        if exact is None:
            w, b = self.quantized_weight_and_bias()
            return F.linear(x, w, b)
        x_codes, w_codes, b_codes, scale = exact  # summed as integers (WeightCodes.integer_operands says why)
        return F.linear(x_codes, w_codes, b_codes) * scale

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
        wt, w_zp = ex.weight_codes(op.tensors["weight"].numpy().T, "wT", exact=True)
        if ins[0].kind == "acc":  # 16-bit codes: MatMulInteger reads them a byte plane at a time
            return ex.wide_accumulator(op, ins[0], lambda plane, x_zp: ex.node("MatMulInteger", [plane, wt, x_zp, w_zp],
                                                                                 "matmulint"))
        x = ex.as_codes_input(ins[0], op)
        acc = ex.node("MatMulInteger", [x.name, wt, ex.const("x_zp", np.uint8(x.zero_point)), w_zp], "matmulint")
        return ex.accumulator(op, acc)

    def onnx_fast(self, ex, op, ins):
        if ins[0].kind == "real":  # a 16-bit input grid stays real in the fast export: a float MatMul
            w, bias = ex.real_weights(op)
            y = ex.node("MatMul", [ins[0].name, ex.const("wT", w.T.copy())], "matmul")
            return ex.tensor(y if bias is None else ex.node("Add", [y, ex.const("bias", bias)], "bias"), "real")
        x = ex.as_codes_input(ins[0], op)
        scale = op.scale.reshape(-1).double()  # the accumulator's: S_w · S_in per output row
        rows = op.tensors["weight"].shape[0]
        bias = [ex.const("bias", (op.tensors["bias"].double() * scale).numpy().astype(np.float32))] if "bias" in op.tensors else []
        w_scale = (scale / x.scale).expand(rows).numpy().astype(np.float32)
        if op.attrs["w_bits"] <= NBITS and ex.narrow_kernel(op):
            packed, attrs = nbits_weight(op.tensors["weight"])
            scales = np.repeat(w_scale, attrs["K"] // attrs["block_size"] + bool(attrs["K"] % attrs["block_size"]))
            inputs = [ex.real(x), ex.const("w4", packed), ex.const("w_scale", scales)] + (["", "", bias[0]] if bias else [])
            return ex.tensor(ex.node("MatMulNBits", inputs, "matmul4", domain="com.microsoft", **attrs), "real")
        ex.check_int32_products(op)
        wt, w_zp = ex.weight_codes(op.tensors["weight"].numpy().T.copy(), "wT")
        inputs = [x.name, wt, ex.const("x_scale", np.float32(x.scale)), ex.const("w_scale", w_scale),
                  ex.const("x_zp", np.uint8(x.zero_point)), w_zp] + bias
        return ex.tensor(ex.node("MatMulIntegerToFloat", inputs, "matmul8", domain="com.microsoft"), "real")

    def latency_models(self, op, input_shape):
        wt = op.tensors["weight"].numpy().astype(np.int8).T.copy()
        return (
            ("MatMulInteger", ["x", "w", "xz"], {}, {"w": wt, "xz": np.uint8(0)}, "int32"),
            ("MatMul", ["x", "w"], {}, {"w": wt.astype(np.float32)}, "float32"),
        )

    def narrow_latency_models(self, op, input_shape):
        # weights of at most 4 bits run on MatMulNBits (float input), as the fast export emits them
        codes = torch.clamp(op.tensors["weight"], -(2 ** (NBITS - 1) - 1), 2 ** (NBITS - 1) - 1)
        packed, attrs = nbits_weight(codes)
        blocks = packed.shape[1]
        spec = ("MatMulNBits", ["x", "w", "s"], {**attrs, "domain": "com.microsoft"},
                {"w": packed, "s": np.full(packed.shape[0] * blocks, 0.01, np.float32)}, "float32")
        # 8-bit weights reach ±127: uint8 × uint8, as the fast export runs them (see _weighted.SATURATION_FREE)
        wide = ("MatMulInteger", ["x", "w", "xz", "wz"], {},
                {"w": uint8_weights(op.tensors["weight"].numpy().T), "xz": np.uint8(0), "wz": np.uint8(WEIGHT_ZERO_POINT)},
                "int32", "uint8")
        return {**{bits: spec for bits in range(2, NBITS + 1)}, 8: wide}


#: Widest weights the fast export runs on MatMulNBits, and its block of input columns.
NBITS = 4
NBITS_BLOCK = 128


def nbits_weight(codes: torch.Tensor) -> tuple[np.ndarray, dict]:
    """MatMulNBits' B of signed 4-bit weight codes [N, K] in [-8, 7]: uint8 [N, ⌈K/block⌉, block/2], each code + 8
    (the kernel's default zero point) packed two per byte, low nibble first, the last block padded with code 0;
    and the node's attributes."""
    n, k = codes.shape
    blocks = -(-k // NBITS_BLOCK)
    u = torch.full((n, blocks * NBITS_BLOCK), 8, dtype=torch.int16)
    u[:, :k] = codes.to(torch.int16) + 8
    u = u.reshape(n, blocks, NBITS_BLOCK // 2, 2)
    packed = (u[..., 0] | (u[..., 1] << 4)).to(torch.uint8).numpy()
    return packed, {"K": k, "N": n, "bits": NBITS, "block_size": NBITS_BLOCK, "accuracy_level": 4}
