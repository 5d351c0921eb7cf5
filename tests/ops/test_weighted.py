"""The quantized twins' training forward: integer codes summed exactly, then scaled once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessq.ops.conv import QuantConv2d
from hessq.ops.linear import QuantLinear
from hessq.quantizer import ActQuantizer


def _twin(kind: str, w_bits: int, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """A calibrated twin with ``w_bits``-bit weights and a 4-bit input batch on its grid."""
    gen = torch.Generator().manual_seed(0)
    if kind == "conv":
        layer = nn.Conv2d(8, 6, 3, padding=1).to(dtype)
        x = torch.rand(16, 8, 5, 5, generator=gen, dtype=dtype)
        twin = QuantConv2d(layer, w_bits, 4)
    else:
        layer = nn.Linear(12, 5).to(dtype)
        x = torch.rand(16, 3, 12, generator=gen, dtype=dtype)
        twin = QuantLinear(layer, w_bits, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=dtype))
        twin.weight.copy_(layer.weight)
        twin.bias.copy_(0.01 * torch.randn(twin.bias.shape, generator=gen, dtype=dtype))
    q_in = ActQuantizer(4).to(dtype)
    q_in.observing = True
    q_in(x)
    q_in.freeze()
    twin.set_input_quantizer(q_in)
    return twin.train(), q_in.eval()(x)


def _accumulator(twin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The integer model's accumulator Σ c_x·c_w + c_b, in int64 arithmetic."""
    w, _ = twin.integer_weight()
    codes = torch.round(x.double() / twin.act_quantizer.scale.double()).to(torch.int64)
    bias = twin.integer_bias(twin.act_quantizer.scale)
    if isinstance(twin, QuantConv2d):
        acc = F.conv2d(codes.double(), w.double(), padding=1).to(torch.int64)  # sums below 2^53: exact
        return acc + bias.reshape(1, -1, 1, 1)
    return F.linear(codes.double(), w.double()).to(torch.int64) + bias


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_training_forward_is_the_integer_accumulator_scaled_once(kind):
    twin, x = _twin(kind, 2, torch.float64)
    acc = _accumulator(twin, x)
    out = twin(x.requires_grad_())
    scale = twin.weight_quantizer.scale(twin.weight).double() * twin.act_quantizer.scale.double()
    want = acc.double() * (scale.reshape(1, -1, 1, 1) if kind == "conv" else scale)
    assert torch.equal(out.detach(), want)
    zeros = acc == 0
    assert zeros.sum() > 10  # 2-bit weights and no bias term large enough to hide them
    assert torch.all(out.detach()[zeros] == 0)  # exactly 0, not rounding noise: a ReLU after it stops the gradient


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_float32_forward_is_the_accumulator_rounded_once_whatever_the_batch_split(kind):
    # integer sums below 2^24 are exact in float32 in any order, so each output is the exact accumulator times the
    # scale, rounded once (as float64 computes it exactly, then rounds), on any CPU and any split of the batch
    twin, x = _twin(kind, 4, torch.float32)
    scale = twin.weight_quantizer.scale(twin.weight) * twin.act_quantizer.scale  # float32, as the twin takes it
    want = (_accumulator(twin, x).double() * (scale.reshape(1, -1, 1, 1) if kind == "conv" else scale).double()).float()
    whole = twin(x)
    assert torch.equal(whole, want)
    assert torch.equal(torch.cat([twin(x[:5]), twin(x[5:11]), twin(x[11:])]), whole)


def test_straight_through_gradients_reach_input_weight_and_bias():
    twin, x = _twin("linear", 4, torch.float64)
    x.requires_grad_()
    twin(x).pow(2).sum().backward()
    w_q, b_q = twin.quantized_weight_and_bias()
    ref_in = x.detach().clone().requires_grad_()
    w_ref, b_ref = w_q.detach().clone().requires_grad_(), b_q.detach().clone().requires_grad_()
    F.linear(ref_in, w_ref, b_ref).pow(2).sum().backward()
    # the same gradients as through the scaled values: the rounding passes them straight through
    assert torch.allclose(x.grad, ref_in.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(twin.weight.grad, w_ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(twin.bias.grad, b_ref.grad, rtol=1e-12, atol=1e-12)
