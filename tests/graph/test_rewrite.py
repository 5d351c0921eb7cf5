import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from hessq.graph import QuantAdd, QuantConv2d, QuantLinear, UnsupportedOpError, UntraceableModelError, act_quantizers


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DepthwiseNet(nn.Module):
    """MobileNet-style: depthwise 3×3 + BN + ReLU, pointwise 1×1, pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        return self.fc(self.pool(x).flatten(1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.conv_in(x))
        y = self.conv_b(F.relu(self.conv_a(x)))
        x = F.relu(x + y)
        x = F.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


def _batches(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, *shape, generator=g) for _ in range(n)]


def _close_to_float(model, qmodel, x, rel):
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert (out - ref).abs().max() <= rel * ref.abs().max()


def test_resnet20_rewrite_names_twins_and_adds():
    model = hessq.models.resnet20().eval()
    q = hessq.quantize(model, 8, _batches((1, 28, 28)))
    layers = {n: m for n, m in q.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    assert list(layers) == list(hessq.quantizable_layers(model))
    assert isinstance(layers["layer2.0.shortcut.0"], QuantConv2d)
    assert sum(isinstance(m, QuantAdd) for m in q.modules()) == 9
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    # the shortcut conv and the block's first conv read the same tensor: one shared quantizer
    assert q.get_submodule("layer2.0.shortcut.0").act_quantizer is q.get_submodule("layer2.0.conv1").act_quantizer
    # a block's input arrives on the previous add's grid: not quantized twice
    assert q.get_submodule("layer1.1.conv1").act_quantizer is q.quant_add_0.output_quantizer
    _close_to_float(model, q, _batches((1, 28, 28), 1, seed=1)[0], 0.05)
    # the original model is untouched
    assert isinstance(model.layer1[0].conv1, nn.Conv2d) and isinstance(model.layer1[0].bn1, nn.BatchNorm2d)


def test_depthwise_rewrite():
    model = DepthwiseNet().eval()
    q = hessq.quantize(model, 8, _batches((1, 12, 12)), pin_first_last=None)
    dw = q.get_submodule("dw")
    assert isinstance(dw, QuantConv2d) and dw.groups == 8
    assert dw.weight_quantizer.scale(dw.weight).shape == (8,)
    _close_to_float(model, q, _batches((1, 12, 12), 1, seed=1)[0], 0.05)


def test_mlp_rewrite_and_mixed_plan():
    model = MLP().eval()
    plan = {"fc1": (8, 8), "fc2": (4, 4), "head": 6}
    q = hessq.quantize(model, plan, _batches((64,)))
    assert q.layer_bits == {"fc1": (8, 8), "fc2": (4, 4), "head": (6, 8)}
    assert q.fc2.w_bits == 4 and q.fc2.act_quantizer.bits == 4
    assert q.head.act_quantizer.bits == 8
    codes = q.fc2.weight_quantizer(q.fc2.weight) / q.fc2.weight_quantizer.scale(q.fc2.weight)[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7
    _close_to_float(model, q, _batches((64,), 1, seed=1)[0], 0.3)


def test_residual_add_is_quantized_on_one_grid():
    model = Residual().eval()
    q = hessq.quantize(model, 8, _batches((1, 8, 8)), pin_first_last=None)
    adds = [m for m in q.modules() if isinstance(m, QuantAdd)]
    assert len(adds) == 1
    seen = {}
    adds[0].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        q.float_forward(_batches((1, 8, 8), 1, seed=1)[0])
    s = adds[0].output_quantizer.scale
    codes = seen["out"] / s
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    _close_to_float(model, q, _batches((1, 8, 8), 1, seed=1)[0], 0.05)


def test_uniform_plan_keeps_first_and_last_at_8_bits():
    model = hessq.models.resnet20().eval()
    q = hessq.quantize(model, (4, 4), _batches((1, 28, 28), 1))
    assert q.layer_bits["conv1"] == (8, 8) and q.layer_bits["fc"] == (8, 8)
    assert q.layer_bits["layer2.1.conv2"] == (4, 4)
    assert q.get_submodule("layer2.1.conv2").act_quantizer.bits == 4
    q2 = hessq.quantize(model, (4, 4), _batches((1, 28, 28), 1), pin_first_last=None)
    assert q2.layer_bits["conv1"] == (4, 4)


def test_untraceable_model_error_names_module_and_line():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    with pytest.raises(UntraceableModelError) as info:
        hessq.quantize(Net(), 8, _batches((1, 4, 4)))
    msg = str(info.value)
    assert "module `block` (Block)" in msg
    assert "test_rewrite.py" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules" in msg


def test_unknown_op_error_names_op_and_place_and_float_escape():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 4)
            self.soft = nn.Softplus()

        def forward(self, x):
            x = torch.erf(self.fc1(x))
            return self.fc2(self.soft(x))  # the module's own line

    batches = _batches((8,))
    with pytest.raises(UnsupportedOpError) as info:
        hessq.quantize(Gated(), 8, batches)
    msg = str(info.value)
    # every unsupported op in one error, each at the user's line (a module's too, not hessq's tracer)
    assert "torch.erf" in msg and "module Softplus `soft`" in msg and "unsupported='float'" in msg
    assert "return self.fc2(self.soft(x))" in msg and "x = torch.erf(self.fc1(x))" in msg
    assert "_trace.py" not in msg
    q = hessq.quantize(Gated(), 8, batches, unsupported="float")
    assert len(q.float_ops) == 2 and "erf" in q.float_ops[0]


def test_plan_errors():
    model = MLP().eval()
    with pytest.raises(ValueError, match="no bits for layers"):
        hessq.quantize(model, {"fc1": 8}, _batches((64,)))
    with pytest.raises(ValueError, match="does not have"):
        hessq.quantize(model, {"fc1": 8, "fc2": 8, "head": 8, "nope": 8}, _batches((64,)))
    with pytest.raises(ValueError, match="from 2 to 8"):
        hessq.quantize(model, 9, _batches((64,)))
    with pytest.raises(ValueError, match="activation bit width"):
        hessq.quantize(model, (8, 3), _batches((64,)))
    with pytest.raises(ValueError, match="at least one batch"):
        hessq.quantize(model, 8, [])


def test_nan_in_model_is_refused():
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(hessq.ModelError, match="NaN or infinite values in 'fc2.weight'"):
        hessq.quantize(model, 8, _batches((64,)))


def test_act_quantizers_are_all_calibrated():
    q = hessq.quantize(hessq.models.resnet20().eval(), 8, _batches((1, 28, 28), 1))
    quantizers = act_quantizers(q)
    assert len(quantizers) == 9 + 12  # 9 adds + inputs of the convs/fc not fed by an add
    assert all(bool(a.calibrated) for a in quantizers.values())


def test_layer_mapped_to_none_stays_float():
    model = MLP().eval()
    q = hessq.quantize(model, {"fc1": None, "fc2": 4, "head": None}, _batches((64,)))
    assert isinstance(q.fc1, nn.Linear) and isinstance(q.head, nn.Linear)
    assert isinstance(q.fc2, QuantLinear)
    assert len(act_quantizers(q)) == 1
    x = _batches((64,), 1, seed=1)[0]
    with torch.no_grad():
        h = F.relu(model.fc1(torch.flatten(x, 1)))
        expected = model.head(F.relu(q.fc2(q.fc2.act_quantizer(h))))
        torch.testing.assert_close(q(x), expected)


class PooledReLU6(nn.Module):
    """ReLU6 features averaged for a classifier (EfficientNet-Lite's head), beside a direct ReLU6 input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(F.relu6(self.stem(x)))  # a direct ReLU6 output: calibrated
        return self.fc(torch.flatten(self.pool(F.relu6(x)), 1))  # its average: provably in [0, 6]


def test_pooled_relu6_is_quantized_on_its_bound():
    model = PooledReLU6().eval()
    with torch.no_grad():
        model.conv.weight.mul_(0.01)  # the pooled features stay far below 6 on the calibration data
    calib = _batches((1, 8, 8), 2)
    bounded = act_quantizers(hessq.quantize(model, 8, calib, pin_first_last=None))
    fc_in, conv_in = bounded["fc.input_quantizer"], bounded["conv.input_quantizer"]
    assert fc_in.bound == (0.0, 6.0) and not bool(fc_in.signed)
    assert float(fc_in.scale) == pytest.approx(6 / 255)
    assert conv_in.bound is None
    calibrated = act_quantizers(hessq.quantize(model, 8, calib, pin_first_last=None, activation_bounds=False))
    assert calibrated["fc.input_quantizer"].bound is None
    assert float(calibrated["fc.input_quantizer"].scale) < 0.5 * float(fc_in.scale)
    assert float(calibrated["conv.input_quantizer"].scale) == float(conv_in.scale)
    # the bound holds through fine-tuning: the range does not follow the batches
    q = hessq.quantize(model, 8, calib, pin_first_last=None)
    q.train()
    q(calib[0])
    assert float(act_quantizers(q)["fc.input_quantizer"].scale) == pytest.approx(6 / 255)
    assert float(act_quantizers(q)["conv.input_quantizer"].scale) != float(conv_in.scale)


def test_average_of_plain_relu_is_calibrated():
    q = hessq.quantize(DepthwiseNet().eval(), 8, _batches((1, 8, 8)))
    assert all(a.bound is None for a in act_quantizers(q).values())
    with pytest.raises(ValueError, match="must contain 0"):
        hessq.quantizer.ActQuantizer(8, bound=(1.0, 6.0))
    with pytest.raises(ValueError, match="pair of numbers"):
        hessq.quantizer.ActQuantizer(8, bound=6.0)
    with pytest.raises(ValueError, match="must contain 0"):
        hessq.quantizer.ActQuantizer(8, bound=(0.0, float("nan")))


def test_residual_stream_widens_only_adds_that_no_layer_reads():
    import hessq
    from torch import nn

    class Block(nn.Module):  # ConvNeXt's and a pre-LN transformer's shape: the sum feeds a layer and a LayerNorm
        def __init__(self):
            super().__init__()
            self.fc_in, self.fc0, self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            x = self.fc_in(x)
            s = self.fc0(x) + x            # read by fc1: stays 8-bit
            t = self.fc1(s) + s            # read only by the LayerNorm: the residual stream
            return self.fc2(self.norm(t))

    torch.manual_seed(0)
    q = hessq.quantize(Block().eval(), 8, [torch.randn(16, 8) for _ in range(2)], pin_first_last=None)
    bits = {n: a.bits for n, a in hessq.graph.act_quantizers(q).items()}
    assert bits["quant_add_0.output_quantizer"] == 8
    assert bits["quant_add_1.output_quantizer"] == 16 and bits["quant_layer_norm_0.input_quantizer"] == 16
    assert bits["quant_layer_norm_0.output_quantizer"] == 8
    x = torch.randn(4, 8)
    assert torch.equal(q(x), hessq.to_integer(q)(x))
