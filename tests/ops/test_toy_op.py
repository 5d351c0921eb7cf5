"""A new op taught to every stage from this test file alone: no package file is edited.

Two toy families are registered here: a weighted one (a pointwise channel mix written with
``torch.einsum``, which hessq does not know) and an elementwise one (``torch.abs``). The model
using them is quantized, run by the integer model bit for bit as in the quantized model's eval
mode, exported exactly to ONNX and run by ONNX Runtime bit for bit, and costed in a bit plan.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from hessq.data import digits
from hessq.ops import QuantLayer, QuantOp, WeightedOp, register, unregister
from hessq.plan import layer_costs
from tests.ops._endtoend import assert_float_forward_close


class PointwiseMix(nn.Module):
    """y[n, o] = Σ_c W[o, c] x[n, c] + b[o] at every pixel: what a 1×1 conv does, written as einsum."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels_out, channels_in) / channels_in**0.5)
        self.bias = nn.Parameter(torch.randn(channels_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,nchw->nohw", self.weight, x) + self.bias.reshape(1, -1, 1, 1)


class QuantPointwiseMix(QuantLayer):
    def __init__(self, mix: PointwiseMix, w_bits: int, a_bits: int, granularity: str = "channel", num_groups: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(mix.weight.detach().clone())
        self.bias = nn.Parameter(mix.bias.detach().clone())
        self._init_quant(w_bits, a_bits, granularity, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight_and_bias()
        return torch.einsum("oc,nchw->nohw", w, x) + b.reshape(1, -1, 1, 1)


class PointwiseMixOp(WeightedOp):
    name = "toy_pointwise_mix"
    modules = (PointwiseMix,)
    kinds = ("toy_pointwise_mix",)
    twin = QuantPointwiseMix

    def accumulate(self, x, w, attrs, kernel):
        return torch.einsum("oc,nchw->nohw", w, x)  # int64 in, int64 out: exact

    def onnx(self, ex, op, ins):
        x = ex.as_codes_input(ins[0])
        nhwc = ex.node("Transpose", [x.name], "to_nhwc", perm=[0, 2, 3, 1])
        # the exporter's weight constants: exact on every x86 CPU (uint8 around 128; see _Exporter.weight_codes)
        wt, w_zp = ex.weight_codes(op.tensors["weight"].numpy().T, "wT", exact=True)
        acc = ex.node("MatMulInteger", [nhwc, wt, ex.const("x_zp", np.uint8(x.zero_point)), w_zp], "mix")
        return ex.accumulator(op, ex.node("Transpose", [acc], "to_nchw", perm=[0, 3, 1, 2]))


class AbsOp(QuantOp):
    name = "toy_abs"
    functions = (torch.abs,)
    methods = ("abs",)
    canonical = torch.abs
    kinds = ("toy_abs",)
    keeps_grid = True  # |code| · s is |value| on the same grid

    def compile(self, program, node, op, args, kwargs):
        v = args[0]
        return program.emit(node.name, "toy_abs", [v], v.dummy, v.scale, v.qmax)

    def execute(self, op, inputs, kernel):
        return inputs[0].abs()

    def onnx(self, ex, op, ins):
        return ex.tensor(ex.node("Abs", [ex.acc(ins[0])], "abs"), "acc")


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = PointwiseMix(8, 12)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).abs()
        x = F.relu(self.mix(x))
        return self.fc(torch.flatten(F.avg_pool2d(x, 2), 1))


@pytest.fixture
def toy_ops():
    register(PointwiseMixOp)
    register(AbsOp)
    yield
    unregister(AbsOp.name)
    unregister(PointwiseMixOp.name)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return ToyNet().eval()


def test_toy_ops_quantize_run_integer_and_onnx_bit_exact(toy_ops, net, tmp_path):
    calib = digits("train", batch_size=64).take(4)
    q = hessq.quantize(net, 8, calib, pin_first_last=None)
    assert isinstance(q.mix, QuantPointwiseMix) and q.mix.act_quantizer is not None
    assert set(q.layer_bits) == {"conv", "mix", "fc"}
    x = digits("test", batch_size=128).take(1)[0][0]

    imodel = hessq.to_integer(q)
    assert {op.kind for op in imodel.ops} >= {"toy_pointwise_mix", "toy_abs"}
    assert [op.output for op in imodel.layers()] == ["conv", "mix", "fc"]
    # the integer program is the quantized model's eval arithmetic, and it computes the toy ops right:
    # within a few output steps of float fake quantization, and of FP32
    y_int = imodel(x)
    assert torch.equal(q(x), y_int)
    assert_float_forward_close(q, imodel, x, y_int)
    with torch.no_grad():
        assert (y_int.argmax(1) == net(x).argmax(1)).float().mean() >= 0.9

    hessq.export_onnx(imodel, tmp_path / "toy.onnx")
    session = ort.InferenceSession(str(tmp_path / "toy.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"input": x.numpy()})[0], y_int.numpy())

    imodel.save(tmp_path / "toy.hq")
    assert torch.equal(hessq.load_integer(tmp_path / "toy.hq")(x), y_int)


def test_toy_weighted_op_is_costed_and_planned(toy_ops, net):
    costs = layer_costs(net, input_shape=(1, 8, 8))
    mix = costs["mix"]
    assert (mix.kind, mix.num_params, mix.out_channels, mix.has_bias) == ("toy_pointwise_mix", 96, 12, True)
    assert mix.macs == 8 * 8 * 12 * 8  # every pixel, every output channel, every input channel
    assert mix.size_bytes(4) == 96 * 4 // 8 + 12 * 4 + 12 * 4

    batches = digits("train", batch_size=64).take(2)
    sens = hessq.hessian_sensitivity(net, batches, max_samples=20, seed=0)
    assert "mix" in sens and sens["mix"].num_params == 96
    plan = hessq.plan_bits(net, sens, weight_bits=(4, 8), size_limit="50%", input_shape=(1, 8, 8))
    # the plan's totals count the toy layer at the bits it got
    assert plan.size_bytes == sum(costs[n].size_bytes(plan[n]) for n in costs)
    assert plan.bops == sum(costs[n].bops(plan[n], 8) for n in costs)
    assert "mix" in plan.table(markdown=False)
    q = hessq.quantize(net, plan, digits("train", batch_size=64).take(2))
    assert q.mix.w_bits == plan["mix"]


def test_unregistered_op_is_unknown_again(net):
    with pytest.raises(hessq.graph.UnsupportedOpError, match="einsum|abs"):
        hessq.quantize(net, 8, digits("train", batch_size=64).take(1), pin_first_last=None)
