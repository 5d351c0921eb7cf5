"""Tensor × tensor multiply (squeeze-excitation gates x · σ(s), gating): both inputs on per-tensor grids, the
integer product requantized onto the output grid by one dyadic number b/2^c ≈ s_a·s_b / s_out.

A tensor times a positive number or a positive constant tensor (a layer scale) keeps its codes and multiplies its
scale.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from hessq.ops._program import Value
from hessq.ops._registry import QuantOp, is_shape_arithmetic, register
from hessq.ops.quant import to_grid
from hessq.quantizer import ActQuantizer, dyadic, requantize


class QuantMul(nn.Module):
    """Fake-quant product: q_out(q_a(a) · q_b(b))."""

    def __init__(self, quantizer_a: ActQuantizer, quantizer_b: ActQuantizer, output_quantizer: ActQuantizer) -> None:
        super().__init__()
        self.quantizer_a, self.quantizer_b = quantizer_a, quantizer_b
        self.output_quantizer = output_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self.quantizer_a(a) * self.quantizer_b(b))


def _tensor_node(a) -> bool:
    """A tensor computed by the model (not a size, not a parameter read directly)."""
    return isinstance(a, fx.Node) and a.op != "get_attr" and not is_shape_arithmetic(a)


@register
class Mul(QuantOp):
    name = "mul"
    modules = (QuantMul,)
    functions = (operator.mul, operator.imul, torch.mul)
    methods = ("mul",)
    canonical = operator.mul
    kinds = ("mul", "rescale")

    def matches(self, node, modules):
        if not super().matches(node, modules):
            return False
        return node.op == "call_module" or any(_tensor_node(a) for a in node.args)  # not size arithmetic

    def canonical_call(self, node, module):
        if module is not None or node.kwargs or len(node.args) != 2:
            return None
        return tuple(node.args), {}

    def requantizing_module(self, node, new_quantizer):
        if node.kwargs or len(node.args) != 2 or not all(_tensor_node(a) for a in node.args):
            return None  # a tensor times a number: the codes stay, the scale changes
        return QuantMul(new_quantizer(), new_quantizer(), new_quantizer()), tuple(node.args)

    def compile(self, program, node, m, args, kwargs):
        if not isinstance(m, QuantMul):
            v, k = (args[0], args[1]) if isinstance(args[0], Value) else (args[1], args[0])
            if isinstance(k, torch.Tensor) and isinstance(v, Value) and k.numel() == 1:
                k = float(k)
            positive = isinstance(v, Value) and v.scale is not None and not v.pending_pads and (
                (isinstance(k, numbers.Real) and k > 0) or (isinstance(k, torch.Tensor) and bool((k > 0).all())
                                                             and torch.broadcast_shapes(v.dummy.shape, k.shape) == v.dummy.shape))
            if not positive:
                program.fail(node, "a product of a tensor and a constant that is not positive")
            # a positive number or constant tensor (ConvNeXt's layer scale): the same codes stand for k times the
            # value, so only the scale changes (the integer op is the identity; the fast export multiplies)
            factor = torch.as_tensor(k, dtype=torch.float64)
            return program.emit(node.name, "rescale", [v], v.dummy, v.scale * factor, v.qmax, tensors={"factor": factor})
        a = to_grid(program, f"{node.name}_a", args[0], m.quantizer_a)
        b = to_grid(program, f"{node.name}_b", args[1], m.quantizer_b)
        q = m.output_quantizer
        if a.qmax * b.qmax >= 2**32:  # the product times a 31-bit dyadic numerator must stay within int64
            program.fail(node, f"a product of {m.quantizer_a.bits}-bit and {m.quantizer_b.bits}-bit codes")
        bb, cc = dyadic(a.scale * b.scale / q.scale.double())
        return program.emit(node.name, "mul", [a, b], a.dummy * b.dummy, q.scale.double(), max(-q.qmin, q.qmax),
                            {"qmin": q.qmin, "qmax": q.qmax}, {"b": bb, "c": cc})

    def execute(self, op, inputs, kernel):
        t, a = op.tensors, op.attrs
        if op.kind == "rescale":
            return inputs[0]
        return requantize(inputs[0] * inputs[1], t["b"], t["c"], a["qmin"], a["qmax"])

    def onnx(self, ex, op, ins):
        if op.kind == "rescale":
            t, factor = ins[0], op.tensors["factor"]
            if t.kind == "codes" and factor.dim() == 0:
                return ex.tensor(t.name, "codes", t.scale * float(factor), t.zero_point)
            return ex.tensor(ex.acc(t), "acc")  # integers whose scale the program carries
        # the product of two codes (< 2^32) is exact in float64
        product = ex.node("Mul", [ex.acc(ins[0]), ex.acc(ins[1])], "product")
        return ex.to_codes(ex.round_half_up(product, op.tensors["b"], op.tensors["c"]), op.attrs["qmin"],
                           op.attrs["qmax"], float(op.scale))

    def onnx_fast(self, ex, op, ins):
        if op.kind == "rescale":
            factor = ex.const("factor", op.tensors["factor"].numpy().astype(np.float32))
            return ex.tensor(ex.node("Mul", [ex.real(ins[0]), factor], "rescale"), "real")
        y = ex.tensor("", "codes", float(op.scale), 128 if op.attrs["qmin"] < 0 else 0)
        if all(t.kind == "codes" for t in ins):
            # ONNX Runtime's int8 multiply (com.microsoft QLinearMul), each input on its own grid
            inputs = [part for t in ins for part in (t.name, *ex.scale_zp(t))] + list(ex.scale_zp(y))
            y.name = ex.node("QLinearMul", inputs, "qmul", domain="com.microsoft")
            ex.uses_ms_domain = True
            return y
        product = ex.node("Mul", [ex.real(ins[0]), ex.real(ins[1])], "mul")
        return ex.on_grid(product, op, "mul_q")
