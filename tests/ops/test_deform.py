"""The deformable conv family: the fake-quant twin and the integer kernel sample the same pixels and agree bit for
bit; the exact ONNX export equals the integer model; the bilinear variants refuse integer conversion clearly."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from hessq.nn import DeformConv2d
from hessq.ops import IntegerConversionError
from hessq.ops.deform import gather_codes, integer_offsets, offset_multiplier
from hessq.plan import layer_costs
from tests.ops._endtoend import calibration, end_to_end, warm_batchnorm

SHAPE = (3, 12, 12)


def _deform(channels: int, groups: int, **options) -> DeformConv2d:
    layer = DeformConv2d(channels, channels, 3, 1, 1, groups=groups, round_offsets=True, **options)
    # offsets of several pixels, some pointing outside the image
    nn.init.normal_(layer.offset.weight, std=0.8 if not options.get("square") else 0.3)
    nn.init.uniform_(layer.offset.bias, -2.0, 2.0)
    return layer


class Detector(nn.Module):
    """CoDeNet's decoder block in small: pointwise conv, depthwise deformable conv, BatchNorm, ReLU, a head."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(3, 6, 1)
        self.deform = _deform(6, 6, **options)
        self.norm = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.norm(self.deform(F.relu(self.pointwise(x))))))


def _acc_of(e, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input codes, int64 accumulator, its per-channel scale) of the deform op writing ``name``."""
    env = e.values()
    op = next(o for o in e.imodel.ops if o.kind == "deform_conv2d" and o.output == name)
    return env[op.inputs[0]], env[op.output], op.scale


def _twin_accumulator(twin, codes: torch.Tensor, acc_scale: torch.Tensor) -> torch.Tensor:
    """The twin's float output on the real values of ``codes``, put back on the accumulator grid."""
    x = (codes.double() * twin.act_quantizer.scale.double()).float()
    with torch.no_grad():
        y = twin(x)
    return torch.round(y.double() / acc_scale).to(torch.int64)


@pytest.mark.parametrize("options", [{"offset_bound": 8.0}, {"square": True}])
def test_rounded_deformable_layer_is_bit_exact_end_to_end(options, tmp_path):
    model = warm_batchnorm(Detector(**options), SHAPE)
    # integer model = quantized model's eval, exact ONNX = integer model in ONNX Runtime, saved and loaded
    e = end_to_end(model, SHAPE, tmp_path, kinds={"deform_conv2d"}, plan=(4, 8))
    assert "norm" not in dict(e.qmodel.named_modules())  # the BatchNorm folded into the deformable conv
    op = e.op("deform_conv2d")
    assert op.attrs["w_bits"] == 4 and op.tensors["offset_weight"].dtype == torch.int8
    assert torch.equal(e.imodel(e.x, kernel="int64"), e.y_int)

    codes, acc, acc_scale = _acc_of(e, op.output)
    offsets = integer_offsets(codes, op.tensors, op.attrs, "int64")
    assert offsets.abs().max() >= 2  # the layer really deforms
    if options.get("offset_bound"):
        assert offsets.abs().max() <= 8
    if options.get("square"):
        scale = offsets[:, 0:1]  # tap (0, 0) moves by (-s, -s)
        assert torch.equal(offsets[:, 1:2], scale) and (-scale).min() >= 0 and (-scale).max() <= 8
    # the twin computes the same offsets from the same codes ...
    twin = e.qmodel.deform
    x_real = (codes.double() * twin.act_quantizer.scale.double()).float()
    assert torch.equal(twin.compute_offsets(x_real).to(torch.int64), offsets)
    # ... and its float output, on the accumulator grid, is the integer accumulator bit for bit
    assert torch.equal(_twin_accumulator(twin, codes, acc_scale), acc)


def test_first_layer_float_forward_agrees_with_the_integer_model_bit_for_bit(tmp_path):
    # a full (groups=1), unbounded, strided layer reading the model input: the float fake-quant forward and the
    # integer program see the same codes, so they agree on the accumulator grid bit for bit
    model = nn.Sequential(DeformConv2d(3, 4, 3, 2, 1, round_offsets=True))
    nn.init.normal_(model[0].offset.weight, std=1.0)
    q = hessq.quantize(model, 8, calibration(SHAPE), pin_first_last=None)
    imodel = hessq.to_integer(q)
    x = calibration(SHAPE, 1, 8, seed=7)[0][0]
    op = next(o for o in imodel.ops if o.kind == "deform_conv2d")
    env = imodel.run(x, keep=True)
    assert integer_offsets(env[op.inputs[0]], op.tensors, op.attrs, "int64").abs().max() > 6  # reaching outside
    y_float = q.float_forward(x).detach().double()
    assert torch.equal(torch.round(y_float / op.scale).to(torch.int64), env[op.output])
    assert torch.equal(q(x), imodel(x))
    hessq.export_onnx(imodel, tmp_path / "exact.onnx")
    session = ort.InferenceSession(str(tmp_path / "exact.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"input": x.numpy()})[0], imodel(x).numpy())


def test_integer_gather_of_constant_offsets_is_a_shifted_image():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 256, (2, 3, 9, 8), generator=g)
    attrs = {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}
    dy, dx = -2, 3
    offsets = torch.zeros(2, 18, 9, 8, dtype=torch.int64)
    offsets[:, 0::2], offsets[:, 1::2] = dy, dx
    columns = gather_codes(codes, offsets, attrs)
    padded = F.pad(codes, (1, 1, 1, 1))  # shifted[y, x] = padded[y + dy, x + dx], zero outside
    shifted = torch.zeros_like(padded)
    shifted[:, :, -dy:, : 10 - dx] = padded[:, :, : 11 + dy, dx:]
    expected = F.unfold(shifted.double(), 3).reshape(2, 27, 9, 8).to(torch.int64)
    assert torch.equal(columns, expected)


def test_offset_multiplier_is_accurate_and_exact_in_float64():
    m = torch.tensor([3.1e-5, 0.7, 1.9e-9, 12.5], dtype=torch.float64)
    for bound in (1000, 2**30):
        b, c = offset_multiplier(m, bound)
        assert (b * bound < 2**51).all() and (c <= 52).all()
        bits = min(31, 51 - bound.bit_length())
        # bits-bit precision, or a shift of at most 52 (a tiny m: a fraction of a pixel per accumulator step)
        assert ((torch.ldexp(b.double(), -c) - m).abs() <= torch.clamp(m * 2.0 ** -(bits - 1), min=2.0**-53)).all()
    with pytest.raises(IntegerConversionError, match="accumulate"):
        offset_multiplier(m, 2**46)


def test_bilinear_variants_quantize_but_have_no_integer_form():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DeformConv2d(4, 4, 3, 1, 1, groups=4, offset_bound=8))
    nn.init.normal_(model[1].offset.weight, std=0.3)
    q = hessq.quantize(model, 8, calibration(SHAPE), pin_first_last=None)
    x = calibration(SHAPE, 1, 2, seed=3)[0][0]
    # fake quantization runs, with fractional offsets
    assert q.float_forward(x).shape == (2, 4, 12, 12)
    twin = q.get_submodule("1")
    raw = twin.compute_offsets(twin.act_quantizer(F.conv2d(x, model[0].weight, model[0].bias)))
    assert not torch.equal(raw, torch.round(raw))
    with pytest.raises(IntegerConversionError, match="round_offsets=True"):
        hessq.to_integer(q)


@pytest.mark.parametrize("round_offsets", [False, True])
def test_training_the_twin_reaches_weights_and_offset_branch(round_offsets):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DeformConv2d(4, 4, 3, 1, 1, groups=4, square=True,
                                                           round_offsets=round_offsets))
    nn.init.constant_(model[1].offset.bias, 1.3)
    nn.init.normal_(model[1].offset.weight, std=0.1)
    q = hessq.quantize(model, 4, calibration(SHAPE), pin_first_last=None)
    q.train()
    q(calibration(SHAPE, 1, 2, seed=4)[0][0]).square().sum().backward()
    twin = q.get_submodule("1")
    for p in (twin.weight, twin.bias, twin.offset_weight, twin.offset_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_offset_branch_is_part_of_the_layer_in_names_and_costs():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DeformConv2d(4, 4, 3, 2, 1, groups=4))
    assert list(hessq.quantizable_layers(model)) == ["0", "1"]
    costs = layer_costs(model, input_shape=SHAPE)
    pixels = 6 * 6
    assert costs["1"].kind == "deform_conv2d" and costs["1"].num_params == 4 * 9
    assert costs["1"].macs == pixels * 4 * 9 + pixels * 18 * 4 * 9  # the conv and its offset branch
