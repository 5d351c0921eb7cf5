"""Integer LayerNorm (I-BERT): integer mean and variance, integer square root by Newton's iteration, no float;
bit for bit the quantized model's eval mode and the exact ONNX export, and close to the float LayerNorm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessq.ops.layernorm import FRACTION_BITS, isqrt
from tests.ops._endtoend import assert_float_forward_close, end_to_end


def test_integer_square_root_is_the_floor_of_the_square_root():
    g = torch.Generator().manual_seed(0)
    roots = torch.randint(1, 2**31, (3000,), generator=g)
    around_squares = (roots**2).unsqueeze(1) + torch.tensor([-1, 0, 1])  # where a floor is easiest to miss
    t = torch.cat([
        torch.arange(1, 5000),
        torch.randint(1, 2**62, (20000,), generator=g),
        around_squares.flatten(),
        torch.tensor([2**62 - 1, 2**60, 2**52 - 1, 2**31 - 1]),
    ]).clamp(1, 2**62 - 1)
    r = isqrt(t)
    assert ((r * r <= t) & ((r + 1) * (r + 1) > t)).all()
    assert [int(v) for v in r[:100]] == [math.isqrt(int(v)) for v in t[:100]]


class ChannelsLast(nn.Module):
    """ConvNeXt's block shape: a conv, then LayerNorm and Linear layers on channels-last pixels, a layer scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8, eps=1e-6)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.layer_scale = nn.Parameter(torch.rand(8, 1, 1) + 0.1)
        self.head_norm_weight = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        x = self.conv(x)
        y = self.fc2(F.gelu(self.fc1(self.norm(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        z = F.layer_norm(x.mean([2, 3]), (8,), self.head_norm_weight, None, 1e-5)
        return self.head(z)


@pytest.mark.parametrize("residual_bits", [8, 16])
def test_layernorm_and_channels_last_linear_end_to_end(tmp_path, residual_bits):
    model = ChannelsLast().eval()
    # 8: 8-bit LayerNorm inputs, percentile ranges; 16: the defaults for a model with LayerNorm (16-bit residual
    # stream, mse ranges)
    options = {"residual_bits": 8, "act_range": "percentile"} if residual_bits == 8 else {}
    e = end_to_end(model, (2, 6, 6), tmp_path, kinds={"layer_norm", "rescale", "lut"}, **options)
    assert {m.input_quantizer.bits for m in e.qmodel.modules() if type(m).__name__ == "QuantLayerNorm"} == {residual_bits}
    if residual_bits == 8:
        # these 8-bit grids leave float32 fake quantization no rounding to flip here: the same logits but for the
        # last requantization. (A 16-bit grid is finer than float32's error in x/s at its ends, so only the bound
        # below, the method's own, holds there.)
        assert_float_forward_close(e.qmodel, e.imodel, e.x, e.y_int)
    # each integer LayerNorm is the float LayerNorm of its input codes' real values, up to the method's two floors:
    # r = ⌊D·2^k/σ⌋ is within 2^-k of D·2^k/σ, and σ = ⌊√T⌋ within 1 of √T (so z within |z|/σ), plus half a step of β
    values = e.values()
    for op in (o for o in e.imodel.ops if o.kind == "layer_norm"):
        producer = next(o for o in e.imodel.ops if o.output == op.inputs[0])
        q, n = values[op.inputs[0]], op.attrs["count"]
        module = next(m for m in e.qmodel.modules() if type(m).__name__ == "QuantLayerNorm"
                      and float(m.input_quantizer.scale) == float(producer.scale))
        gamma, beta = module.weight.detach().double(), module.bias.detach().double()
        x_real = q.double() * producer.scale.double()
        eps = op.attrs["eps_codes"] * float(producer.scale) ** 2 / n**3  # ε as the integer T holds it
        z = F.layer_norm(x_real, (n,), None, None, eps)
        d = n * q - q.sum(-1, keepdim=True)
        sigma = isqrt((d * d).sum(-1, keepdim=True) + op.attrs["eps_codes"]).double()
        got = values[op.output].double() * op.scale.double()
        bound = gamma.abs() * (math.sqrt(n) * 2.0**-FRACTION_BITS + z.abs() / sigma) + op.scale.double() / 2
        assert ((got - (gamma * z + beta)).abs() <= bound * (1 + 1e-9) + 1e-12).all()
