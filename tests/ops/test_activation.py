"""Elementwise activations by integer lookup table: every form of each becomes one canonical call, runs as a
table on the integer grid bit for bit as in the quantized model's eval mode and in the exact ONNX export (a Gather
on the uint8 codes), and each table entry is the float function rounded onto the output grid."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from hessq.ops import register_elementwise, unregister
from tests.ops._endtoend import assert_float_forward_close, end_to_end


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


FORMS = {
    "silu": (F.silu, [nn.SiLU(), Lambda(F.silu), Lambda(lambda x: F.silu(x, inplace=True))]),
    "hardswish": (F.hardswish, [nn.Hardswish(), Lambda(F.hardswish)]),
    "hardsigmoid": (F.hardsigmoid, [nn.Hardsigmoid(), Lambda(F.hardsigmoid)]),
    "sigmoid": (torch.sigmoid, [nn.Sigmoid(), Lambda(torch.sigmoid), Lambda(F.sigmoid), Lambda(lambda x: x.sigmoid())]),
    "tanh": (torch.tanh, [nn.Tanh(), Lambda(torch.tanh), Lambda(lambda x: x.tanh())]),
    "gelu": (F.gelu, [nn.GELU(), nn.GELU("tanh"), Lambda(lambda x: F.gelu(x, approximate="tanh"))]),
}
CASES = [(name, i) for name, (_, forms) in FORMS.items() for i in range(len(forms))]


class Net(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.act = act
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv2(self.act(self.conv1(x))).mean([2, 3]))


def _table_guarantee(e, fn, params):
    """Each output code is the function of the input's real value rounded onto the output grid (or clamped)."""
    op = e.op("lut")
    values = e.values()
    producer = next(o for o in e.imodel.ops if o.output == op.inputs[0])
    x_real = values[op.inputs[0]].double() * producer.scale.double()
    out = values[op.output]
    y = fn(x_real, **params) / op.scale.double()
    inside = (y > op.attrs["qmin"]) & (y < op.attrs["qmax"])
    assert ((out.double() - y).abs()[inside] <= 0.5 + 1e-9).all()
    assert (out[~inside] == torch.where(y[~inside] <= op.attrs["qmin"], op.attrs["qmin"], op.attrs["qmax"])).all()
    assert inside.float().mean() > 0.5


@pytest.mark.parametrize("name,form", CASES)
def test_activation_forms_run_by_table(name, form, tmp_path):
    fn, forms = FORMS[name]
    model = Net(forms[form]).eval()
    # one canonical call of the function, whatever the form
    calls = [n for n in hessq.graph.traced(model).graph.nodes if n.op == "call_function" and n.target is fn]
    assert len(calls) == 1
    e = end_to_end(model, (2, 6, 6), tmp_path, kinds={"lut"})
    params = {"approximate": calls[0].kwargs["approximate"]} if name == "gelu" else {}
    _table_guarantee(e, fn, params)
    # within a few output steps of float fake quantization (the same grids; ties round alike up to float error)
    assert_float_forward_close(e.qmodel, e.imodel, e.x, e.y_int)
    table = e.op("lut").tensors["table"]
    assert table.numel() in (255, 256)  # one entry per 8-bit input code (signed grids are symmetric: ±127)


def test_fast_export_runs_the_float_function(tmp_path):
    e = end_to_end(Net(nn.SiLU()).eval(), (2, 6, 6), tmp_path, kinds={"lut"})
    kinds = {n.op_type for n in onnx.load(str(tmp_path / "fast.onnx")).graph.node}
    # ONNX Runtime's float Sigmoid (x·σ(x)) between the int8 kernels, not an elementwise Gather on the codes
    assert "Sigmoid" in kinds and "Gather" not in kinds and "QLinearConv" in kinds
    # agreement: ONNX Runtime rounds its requantization half to even with a float32 multiplier, so a table input
    # can move by one code; the outputs stay close to the integer model's
    assert abs(e.y_fast - e.y_int.numpy()).max() <= 0.1 * float(e.y_int.abs().max()) + 1e-6


def test_any_elementwise_function_registers_as_a_table(tmp_path):
    register_elementwise("erf", torch.erf, methods=("erf",))
    try:
        e = end_to_end(Net(Lambda(lambda x: x.erf())).eval(), (2, 6, 6), tmp_path, kinds={"lut"})
        _table_guarantee(e, torch.erf, {})
        # a function registered without a float ONNX form: the fast export reads the table, as the exact one does
        assert "Gather" in {n.op_type for n in onnx.load(str(tmp_path / "fast.onnx")).graph.node}
    finally:
        unregister("erf")
    with pytest.raises(hessq.graph.UnsupportedOpError, match="erf"):
        hessq.quantize(Net(Lambda(torch.erf)).eval(), 8, [(torch.randn(2, 2, 6, 6),)])


def test_sixteen_bit_activations_get_a_wider_table(tmp_path):
    model = Net(nn.Hardswish()).eval()
    plan = {"conv1": (8, 8), "conv2": (8, 16), "fc": (8, 8)}
    q = hessq.quantize(model, plan, [(torch.randn(16, 2, 6, 6),)], pin_first_last=None)
    imodel = hessq.to_integer(q)
    op = next(o for o in imodel.ops if o.kind == "lut")
    assert op.attrs["qmax"] == 2**15 - 1 or op.attrs["qmax"] == 2**16 - 1  # the output feeds a 16-bit input
    x = torch.randn(4, 2, 6, 6)
    assert torch.equal(q(x), imodel(x))
