"""Tensor × tensor multiply (a squeeze-excitation gate): both inputs on grids, the integer product requantized by
one dyadic number; a tensor times a positive number only changes the scale."""

from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from hessq.quantizer import dyadic_value
from tests.ops._endtoend import assert_float_forward_close, end_to_end


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        y = x * gate
        return self.head(y * 0.5).mean([2, 3])


def test_gate_product_is_requantized_by_one_dyadic_number(tmp_path):
    e = end_to_end(SqueezeExcite().eval(), (2, 6, 6), tmp_path, kinds={"mul", "lut"})
    op = e.op("mul")
    values = e.values()
    scales = [next(o for o in e.imodel.ops if o.output == name).scale.double() for name in op.inputs]
    a, b = (values[name] for name in op.inputs)
    assert all(s.dim() == 0 for s in scales)  # per-tensor grids
    # the requantized product is the real product a·s_a · b·s_b on the output grid, rounded half up: within half a
    # step (plus the dyadic number's relative error below 2^-30), or clamped
    exact = (a * b).double() * dyadic_value(op.tensors["b"], op.tensors["c"])
    assert abs(float(dyadic_value(op.tensors["b"], op.tensors["c"])) / float(scales[0] * scales[1] / op.scale) - 1) < 2**-29
    inside = (exact > op.attrs["qmin"]) & (exact < op.attrs["qmax"])
    assert ((values[op.output].double() - exact).abs()[inside] <= 0.5).all()
    assert_float_forward_close(e.qmodel, e.imodel, e.x, e.y_int)
    # the fast export multiplies on int8 codes (com.microsoft QLinearMul)
    assert "QLinearMul" in {n.op_type for n in onnx.load(str(tmp_path / "fast.onnx")).graph.node}


def test_product_with_a_number_keeps_the_codes(tmp_path):
    e = end_to_end(SqueezeExcite().eval(), (2, 6, 6), tmp_path)
    assert sum(op.kind == "mul" for op in e.imodel.ops) == 1  # y * 0.5 emits no op
    head_in = next(o for o in e.imodel.ops if o.kind == "requantize" and "head" in o.output)
    y = next(o for o in e.imodel.ops if o.kind == "mul")
    # the head's input quantizer reads the gate product's codes at half its scale
    assert torch.allclose(torch.ldexp(head_in.tensors["b"].double(), -head_in.tensors["c"]),
                          0.5 * y.scale.double() / head_in.scale.double(), rtol=2**-29)
