"""ReLU and ReLU6 on codes: a clamp at code 0 (and at the code of 6)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessq.ops._registry import QuantOp, register


@register
class ReLU(QuantOp):
    name = "relu"
    modules = (nn.ReLU,)
    functions = (F.relu, torch.relu, torch.relu_, F.relu_)
    methods = ("relu", "relu_")
    canonical = F.relu
    kinds = ("relu",)
    keeps_grid = True

    def canonical_call(self, node, module):
        return (node.args[0],), {}  # inplace or not: the same value

    def compile(self, program, node, op, args, kwargs):
        v = args[0]
        if v.scale is None:
            program.fail(node, "ReLU on a float input")
        return program.emit(node.name, "relu", [v], v.dummy, v.scale, v.qmax)

    def execute(self, op, inputs, kernel):
        return inputs[0].clamp(min=0)

    def onnx(self, ex, op, ins):
        t = ins[0]
        if t.kind in ("real", "acc"):
            return ex.tensor(ex.node("Relu", [t.name], "relu"), t.kind)
        if t.zero_point == 0:
            return t
        return ex.tensor(ex.node("Max", [t.name, ex.const("zero", np.uint8(t.zero_point))], "relu"), "codes", t.scale, t.zero_point)


@register
class ReLU6(QuantOp):
    name = "relu6"
    modules = (nn.ReLU6,)
    functions = (F.relu6,)
    canonical = F.relu6
    kinds = ("clamp",)
    output_range = (0.0, 6.0)

    def canonical_call(self, node, module):
        return (node.args[0],), {}

    def compile(self, program, node, op, args, kwargs):
        v = args[0]
        if v.scale is None:
            program.fail(node, "ReLU6 on a float input")
        full = v.scale.expand(v.dummy.shape)[:1] if v.scale.dim() else v.scale
        six = torch.floor(6.0 / full + 0.5).to(torch.int64)  # the code of 6 on each channel's grid
        return program.emit(node.name, "clamp", [v], v.dummy, v.scale, v.qmax, tensors={"max": six})

    def execute(self, op, inputs, kernel):
        return torch.minimum(inputs[0].clamp(min=0), op.tensors["max"])

    def onnx(self, ex, op, ins):
        t = ins[0]
        if t.kind == "acc":
            six = op.tensors["max"].double().numpy()
            return ex.tensor(ex.node("Min", [ex.node("Relu", [t.name], "relu"), ex.const("six", six)], "relu6"), "acc")
        if t.kind == "real":
            six = (op.tensors["max"].double() * op.scale.double()).numpy().astype(np.float32)
            return ex.tensor(ex.node("Min", [ex.node("Relu", [t.name], "relu"), ex.const("six", six)], "relu6"), "real")
        hi = min(255, t.zero_point + int(op.tensors["max"].reshape(-1)[0]))
        lo, hi_c = ex.const("lo", np.uint8(t.zero_point)), ex.const("hi", np.uint8(hi))
        return ex.tensor(ex.node("Clip", [t.name, lo, hi_c], "relu6"), "codes", t.scale, t.zero_point)
