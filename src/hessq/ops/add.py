"""Residual add of two tensors: each branch requantized onto the output grid by its own dyadic number,
added in integers, clamped."""

from __future__ import annotations

import operator

import torch
from torch import nn

from hessq.ops._program import Value
from hessq.ops._registry import QuantOp, is_shape_arithmetic, register
from hessq.quantizer import ActQuantizer, dyadic, requantize, round_ste

WIDE = 2**62  # branches are clamped only after the add


class QuantAdd(nn.Module):
    """Fake-quant residual add: each branch rounded onto the output grid, the codes added, then clamped."""

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


def dyadic_inputs(program, node, args) -> tuple[list[Value], dict[str, torch.Tensor]]:
    """The inputs as values, and b_i, c_i of the dyadic numbers taking each onto the output grid of ``node``'s
    quantizer. A constant input (a position embedding, a class token) becomes its codes on that grid."""
    s_out = program.modules[node.target].output_quantizer.scale.double()
    ref = next((a for a in args if isinstance(a, Value)), None)
    values, tensors = [], {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and ref is not None and ref.scale is not None:
            a = constant_codes(program, node, f"{node.name}_const{i}", a, s_out, ref)
        if not isinstance(a, Value) or a.scale is None:
            program.fail(node, "an add or cat with an unquantized float input")
        tensors[f"b{i}"], tensors[f"c{i}"] = dyadic(a.scale / s_out)
        values.append(a)
    return values, tensors


def constant_codes(program, node, name: str, const: torch.Tensor, scale: torch.Tensor, ref: Value) -> Value:
    """Emit a constant's codes round(c / scale) (unclamped, as the fake-quant add and cat round it), its batch
    dimension following ``ref``'s."""
    codes = torch.round(const.double() / scale).to(torch.int64)
    if codes.dim() < ref.dummy.dim():  # broadcast from the right, as the float op does
        codes = codes.reshape([1] * (ref.dummy.dim() - codes.dim()) + list(codes.shape))
    if codes.dim() != ref.dummy.dim() or codes.shape[0] != 1:
        program.fail(node, "a constant with a batch dimension of its own")
    qmax = int(codes.abs().max()) if codes.numel() else 0
    return program.emit(name, "constant", [ref], codes.expand(ref.dummy.shape[0], *codes.shape[1:]), scale, qmax,
                        tensors={"codes": codes})


@register
class Add(QuantOp):
    name = "add"
    modules = (QuantAdd,)
    carries_residual = True
    functions = (operator.add, operator.iadd, torch.add)
    methods = ("add",)
    canonical = operator.add
    kinds = ("add",)

    def canonical_call(self, node, module):
        if module is not None or node.kwargs or len(node.args) != 2:
            return None  # torch.add(a, b, alpha=...) keeps its form
        return tuple(node.args), {}

    def requantizing_module(self, node, new_quantizer):
        args = node.args
        if node.kwargs or len(args) != 2 or not all(isinstance(a, torch.fx.Node) and not is_shape_arithmetic(a) for a in args):
            return None
        return QuantAdd(new_quantizer()), tuple(args)

    def compile(self, program, node, op, args, kwargs):
        if not isinstance(op, QuantAdd):
            program.fail(node, "an add of a tensor and a constant")
        q = op.output_quantizer
        args, tensors = dyadic_inputs(program, node, args)
        return program.emit(node.name, "add", args, args[0].dummy + args[1].dummy, q.scale.double(),
                            max(-q.qmin, q.qmax), {"qmin": q.qmin, "qmax": q.qmax}, tensors)

    def execute(self, op, inputs, kernel):
        t = op.tensors
        y = requantize(inputs[0], t["b0"], t["c0"], -WIDE, WIDE) + requantize(inputs[1], t["b1"], t["c1"], -WIDE, WIDE)
        return torch.clamp(y, op.attrs["qmin"], op.attrs["qmax"])

    def onnx(self, ex, op, ins):
        a, b = (ex.round_half_up(ex.acc(t), op.tensors[f"b{i}"], op.tensors[f"c{i}"]) for i, t in enumerate(ins))
        return ex.to_codes(ex.node("Add", [a, b], "add"), op.attrs["qmin"], op.attrs["qmax"], float(op.scale))

    def onnx_fast(self, ex, op, ins):
        if all(t.kind == "codes" for t in ins) and op.attrs["qmax"] <= 127:
            # ONNX Runtime's int8 residual add (com.microsoft QLinearAdd), each input on its own grid. A ReLU
            # that alone follows is folded in, as ONNX Runtime's own quantizer does: the sum goes on the
            # unsigned grid of the same scale, which clips at 0 (and at 255 steps instead of 127).
            users = ex.users.get(op.output, [])
            relu = users[0] if len(users) == 1 and users[0].kind == "relu" else None
            y = ex.tensor("", "codes", float(op.scale), 128 if op.attrs["qmin"] < 0 and relu is None else 0)
            inputs = [part for t in ins for part in (t.name, *ex.scale_zp(t))] + list(ex.scale_zp(y))
            y.name = ex.node("QLinearAdd", inputs, "qadd", domain="com.microsoft")
            ex.uses_ms_domain = True
            if relu is not None:
                ex.fused.add(relu.output)
                ex.values[relu.output] = y
            return y
        total = ex.node("Add", [ex.real(ins[0]), ex.real(ins[1])], "add")
        if ex.read_as_real(op):  # only float kernels read the sum (a transformer's LayerNorm): saturated, not rounded
            return ex.clipped(total, op)
        return ex.on_grid(total, op, "add_q")
