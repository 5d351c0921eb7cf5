"""Concatenation: each input requantized onto the one output grid, then joined."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from hessq.ops._registry import QuantOp, register
from hessq.ops.add import dyadic_inputs
from hessq.quantizer import ActQuantizer, requantize, round_ste


class QuantCat(nn.Module):
    """Fake-quant concatenation: each input rounded onto the one output grid, then joined."""

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


@register
class Cat(QuantOp):
    name = "cat"
    modules = (QuantCat,)
    functions = (torch.cat, torch.concat, torch.concatenate)
    canonical = torch.cat
    kinds = ("cat",)

    def canonical_call(self, node, module):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return (tensors, dim), {}

    def requantizing_module(self, node, new_quantizer):
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors) or not isinstance(dim, int):
            return None
        return QuantCat(new_quantizer(), dim), tuple(tensors)

    def compile(self, program, node, op, args, kwargs):
        if not isinstance(op, QuantCat):
            program.fail(node, "a concatenation of tensors that are not all on a grid")
        q = op.output_quantizer
        args, tensors = dyadic_inputs(program, node, args)
        dummy = torch.cat([a.dummy for a in args], op.dim)
        return program.emit(node.name, "cat", args, dummy, q.scale.double(), max(-q.qmin, q.qmax),
                            {"qmin": q.qmin, "qmax": q.qmax, "dim": op.dim}, tensors)

    def execute(self, op, inputs, kernel):
        a, t = op.attrs, op.tensors
        return torch.cat([requantize(v, t[f"b{i}"], t[f"c{i}"], a["qmin"], a["qmax"]) for i, v in enumerate(inputs)], a["dim"])

    def onnx(self, ex, op, ins):
        parts = [
            ex.to_codes(ex.round_half_up(ex.acc(t), op.tensors[f"b{i}"], op.tensors[f"c{i}"]), op.attrs["qmin"], op.attrs["qmax"], float(op.scale))
            for i, t in enumerate(ins)
        ]
        return ex.tensor(ex.node("Concat", [p.name for p in parts], "cat", axis=op.attrs["dim"]), "codes", float(op.scale), parts[0].zero_point)

    def onnx_fast(self, ex, op, ins):
        parts = [ex.on_grid(ex.real(t), op, "cat_q") for t in ins]
        return ex.tensor(ex.node("Concat", [p.name for p in parts], "cat", axis=op.attrs["dim"]), "codes", float(op.scale), parts[0].zero_point)
