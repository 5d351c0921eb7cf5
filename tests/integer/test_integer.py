import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from hessq.integer import IntegerConversionError
from hessq.fakequant import QuantizedModel


class ConcatNet(nn.Module):
    """Depthwise convs, ReLU6, zero padding, a concatenation, max and average pooling, a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.pad = nn.ZeroPad2d((1, 1, 1, 1))
        self.branch = nn.Conv2d(8, 8, 3)
        self.mix = nn.Conv2d(16, 16, 1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.pw(F.relu6(self.dw(x))))
        x = F.relu(x + y)
        z = torch.cat([F.max_pool2d(x, 2), F.max_pool2d(F.relu(self.branch(self.pad(x))), 2)], 1)
        z = self.pool(F.relu(self.mix(z)))
        return self.fc(z.flatten(1))


def _random_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _data(shape, n=2, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(n)]


CASES = {
    "resnet20-w8a8": (lambda: _random_bn(hessq.models.resnet20()), (1, 28, 28), 8),
    "resnet20-mixed": (lambda: _random_bn(hessq.models.resnet20()), (1, 28, 28), "mixed"),
    "concat-w8a8": (lambda: _random_bn(ConcatNet()), (1, 12, 12), 8),
    "concat-w4a4": (lambda: _random_bn(ConcatNet()), (1, 12, 12), (4, 4)),
    # TF "same" padding of the float input before the stem, depthwise convs, ReLU6, residual adds.
    "efficientnet-w8a8": (lambda: _random_bn(hessq.models.efficientnet_lite0(pretrained=False)), (3, 32, 32), 8),
}


def _quantized(case):
    build, shape, plan = CASES[case]
    model = build()
    if plan == "mixed":
        plan = {n: (4, 4) if i % 3 == 1 else (8, 8) for i, n in enumerate(hessq.quantizable_layers(model))}
    return model, hessq.quantize(model, plan, _data(shape)), shape


@pytest.mark.parametrize("case", list(CASES))
def test_integer_model_equals_fake_quant_eval_exactly(case, tmp_path):
    model, q, shape = _quantized(case)
    imodel = hessq.to_integer(q)
    for x in _data(shape, n=2, seed=7) + [torch.randn(3, *shape) * 10, torch.zeros(1, *shape)]:
        expected = q(x)
        got = imodel(x)
        assert torch.equal(got, expected)
        assert torch.equal(imodel(x, kernel="int64"), expected)
        # and both are close to the float fake-quant of training mode: the integer program is the right function
        ref = q.float_forward(x)
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-6
    imodel.save(tmp_path / "m.hq")
    loaded = hessq.load_integer(tmp_path / "m.hq")
    x = _data(shape, n=1, seed=9)[0]
    assert torch.equal(loaded(x), imodel(x))


def test_every_integer_value_is_an_integer_tensor_with_its_scale():
    _, q, shape = _quantized("concat-w8a8")
    imodel = hessq.to_integer(q)
    env = imodel.run(_data(shape, n=1)[0], keep=True)
    for op in imodel.ops[:-1]:
        assert env[op.output].dtype == torch.int64, op.kind
        assert op.scale is not None and (op.scale > 0).all()
    for op in imodel.ops:
        if op.kind == "requantize":
            assert (op.tensors["b"] < 2**31).all()
    kinds = {op.kind for op in imodel.ops}
    assert {"quantize", "conv2d", "requantize", "add", "cat", "max_pool2d", "sum_pool2d", "clamp", "pad", "linear", "dequantize"} <= kinds


def test_low_bit_weights_are_packed_two_per_byte(tmp_path):
    _, q8, _ = _quantized("concat-w8a8")
    _, q4, _ = _quantized("concat-w4a4")
    i8, i4 = hessq.to_integer(q8), hessq.to_integer(q4)
    w8 = sum(op.tensors["weight"].numel() for op in i8.layers())
    assert i8.size_bytes() - i4.size_bytes() >= (w8 - 8 * 9 - 8 - 16 * 9 * 10) // 2 - 64  # all but first/last halved


def test_damaged_files_are_refused(tmp_path):
    _, q, _ = _quantized("concat-w8a8")
    path = tmp_path / "m.hq"
    hessq.to_integer(q).save(path)
    blob = path.read_bytes()
    (tmp_path / "short.hq").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        hessq.load_integer(tmp_path / "short.hq")
    data = torch.load(path, weights_only=True)
    first = next(iter(data["tensors"]))
    data["tensors"][first] = data["tensors"][first].clone()
    data["tensors"][first].view(-1)[0] += 1
    torch.save(data, tmp_path / "flipped.hq")
    with pytest.raises(ValueError, match="checksum"):
        hessq.load_integer(tmp_path / "flipped.hq")
    data = torch.load(path, weights_only=True)
    data["header"] = data["header"].replace('"version": 4', '"version": 99')
    torch.save(data, tmp_path / "future.hq")
    with pytest.raises(ValueError, match="version 99"):
        hessq.load_integer(tmp_path / "future.hq")
    with pytest.raises(FileNotFoundError):
        hessq.load_integer(tmp_path / "absent.hq")
    assert not list(tmp_path.glob(".*.tmp"))


def test_ops_without_integer_form_are_named():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(torch.erf(self.fc1(x)))

    q = hessq.quantize(Gate(), 8, _data((8,)), unsupported="float")
    with pytest.raises(IntegerConversionError, match="erf"):
        hessq.to_integer(q)


def test_uncalibrated_model_is_refused():
    model = _random_bn(ConcatNet())
    layers = {n: (8, 8) for n in hessq.quantizable_layers(model)}
    raw = QuantizedModel(hessq.graph.rewrite(model, layers), layers, [])
    with pytest.raises(IntegerConversionError, match="never calibrated"):
        hessq.to_integer(raw)
    with pytest.raises(RuntimeError, match="never calibrated"):
        raw.float_forward(_data((1, 12, 12), n=1)[0])


def test_wrong_input_shape_is_refused():
    _, q, _ = _quantized("concat-w8a8")
    with pytest.raises(ValueError, match="does not match"):
        hessq.to_integer(q)(torch.zeros(1, 1, 14, 14))
