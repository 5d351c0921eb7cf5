"""Activation quantizers: float → codes (quantize), codes → another grid (dyadic requantize), codes → float."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hessq.ops._program import Value
from hessq.ops._registry import QuantOp, register
from hessq.quantizer import ActQuantizer, dyadic, requantize


def to_grid(program, name: str, v: Value, q: ActQuantizer) -> Value:
    """Emit the op writing ``v`` onto ``q``'s grid as ``name``: a quantize of a float value, a dyadic
    requantize of an integer one (what the quantizer computes in fake quantization)."""
    s_out = q.scale.double()
    bound = max(-q.qmin, q.qmax)
    attrs = {"qmin": q.qmin, "qmax": q.qmax}
    if v.scale is None:
        return program.emit(name, "quantize", [v], v.dummy, s_out, bound, attrs, {"scale": s_out})
    b, c = dyadic(v.scale / s_out)
    return program.emit(name, "requantize", [v], v.dummy, s_out, bound, attrs, {"b": b, "c": c})


@register
class Quantize(QuantOp):
    name = "quantize"
    modules = (ActQuantizer,)
    kinds = ("quantize", "requantize", "dequantize")

    def compile(self, program, node, q, args, kwargs):
        v: Value = args[0]
        s_out = q.scale.double()
        bound = max(-q.qmin, q.qmax)
        attrs = {"qmin": q.qmin, "qmax": q.qmax}
        if v.scale is None and v.pending_pads:
            first = f"{node.name}_unpadded"
            program.emit(first, "quantize", [v], v.dummy, s_out, bound, attrs, {"scale": s_out})
            current, dummy = Value(first, v.pending_pads[0][1], s_out, bound), v.pending_pads[0][1]
            for i, (pads, _) in enumerate(v.pending_pads):
                out = node.name if i == len(v.pending_pads) - 1 else f"{node.name}_pad{i}"
                dummy = F.pad(dummy, pads)
                current = program.emit(out, "pad", [current], dummy, s_out, bound, {"pads": pads})
            return current
        return to_grid(program, node.name, v, q)

    def execute(self, op, inputs, kernel):
        x, a, t = inputs[0], op.attrs, op.tensors
        if op.kind == "quantize":
            return torch.clamp(torch.round(x.double() / t["scale"]), a["qmin"], a["qmax"]).to(torch.int64)
        if op.kind == "requantize":
            return requantize(x, t["b"], t["c"], a["qmin"], a["qmax"])
        return (x.double() * t["scale"]).float()

    def onnx(self, ex, op, ins):
        if op.kind == "quantize":
            x = ex.node("Cast", [ins[0].name], "x_f64", to=ex.TP.DOUBLE)
            q = ex.node("Div", [x, ex.const("scale", np.float64(op.tensors["scale"]))], "x_over_s")
            return ex.to_codes(ex.node("Round", [q], "round"), op.attrs["qmin"], op.attrs["qmax"], float(op.scale))
        if op.kind == "requantize":
            rounded = ex.round_half_up(ex.acc(ins[0]), op.tensors["b"], op.tensors["c"])
            return ex.to_codes(rounded, op.attrs["qmin"], op.attrs["qmax"], float(op.scale))
        real = ex.node("Mul", [ex.acc(ins[0]), ex.const("out_scale", op.tensors["scale"].double().numpy())], "dequant")
        return ex.tensor(ex.node("Cast", [real], "output_f32", to=ex.TP.FLOAT), "real")

    def onnx_fast(self, ex, op, ins):
        t = ins[0]
        if op.kind == "quantize":
            return ex.on_grid(t.name, op, "quantize")
        if op.kind == "requantize":
            zp = 128 if op.attrs["qmin"] < 0 else 0
            if t.kind == "codes" and t.scale == float(op.scale) and t.zero_point == zp:
                return t  # a fused kernel already wrote these codes on this grid
            if ex.read_as_real(op):
                # only float kernels read it (a LayerNorm, a softmax, GELU): saturated to the grid's range but not
                # rounded onto it, one pass over the tensor instead of two, within half a step of the integer model's
                return ex.clipped(t, op) if ex.saturation_needed(op) else ex.tensor(ex.real(t), "real")
            return ex.on_grid(ex.real(t), op, "requantize")
        return ex.tensor(ex.real(t), "real")


@register
class Constant(QuantOp):
    """A constant's codes on a grid (emitted by the ops that take constants), its batch dimension following its
    reference input's."""

    name = "constant"
    kinds = ("constant",)

    def matches(self, node, modules):
        return False

    def execute(self, op, inputs, kernel):
        codes = op.tensors["codes"]
        return codes.expand(inputs[0].shape[0], *codes.shape[1:])

    def _expanded(self, ex, op, ref, values: np.ndarray) -> str:
        batch = ex.node("Slice", [ex.node("Shape", [ref.name], "shape"), ex.const("zero", np.array([0], np.int64)),
                                  ex.const("one", np.array([1], np.int64))], "batch")
        shape = ex.node("Concat", [batch, ex.const("dims", np.array(values.shape[1:], np.int64))], "shape", axis=0)
        return ex.node("Expand", [ex.const("codes", values), shape], "constant")

    def onnx(self, ex, op, ins):
        return ex.tensor(self._expanded(ex, op, ins[0], op.tensors["codes"].double().numpy()), "acc")

    def onnx_fast(self, ex, op, ins):
        real = (op.tensors["codes"].double() * op.scale.double()).numpy().astype(np.float32)
        return ex.tensor(self._expanded(ex, op, ins[0], real), "real")
