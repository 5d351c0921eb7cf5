import pytest
import torch

from hessq.quantizer import (
    expand_scale,
    fake_quantize,
    fake_quantize_weight,
    qrange,
    quantization_error,
    quantize_weight,
    round_ste,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_weight_error_within_half_step_per_channel(bits):
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-2, 1, 16).reshape(-1, 1, 1, 1)
    q, scale = quantize_weight(w, bits)
    assert scale.shape == (16,)
    s = expand_scale(scale, w)
    err = (q * s - w).abs()
    assert torch.all(err <= s / 2 + 1e-7)
    assert torch.equal(q, q.round())
    lo, hi = qrange(bits, signed=True)
    assert q.min() >= lo and q.max() <= hi
    # the largest magnitude in each channel maps exactly onto the top code
    assert torch.all(q.abs().flatten(1).amax(1) == hi)


def test_per_channel_scales_follow_each_channel():
    w = torch.zeros(3, 4)
    w[0] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    w[1] = torch.tensor([0.1, 0.05, -0.01, 0.0])
    w[2] = torch.tensor([10.0, 0.0, 0.0, 0.0])
    _, scale = quantize_weight(w, 8)
    assert torch.allclose(scale, torch.tensor([2.0, 0.1, 10.0]) / 127)
    _, tensor_scale = quantize_weight(w, 8, granularity="tensor")
    assert tensor_scale.shape == () and torch.isclose(tensor_scale, torch.tensor(10.0 / 127))


def test_per_group_scales_cover_contiguous_rows():
    w = torch.arange(1, 9, dtype=torch.float32).reshape(8, 1).repeat(1, 4)
    _, scale = quantize_weight(w, 4, granularity="group", num_groups=2)
    assert torch.allclose(scale, torch.tensor([4.0, 8.0]) / 7)
    with pytest.raises(ValueError, match="equal groups"):
        quantize_weight(w, 4, granularity="group", num_groups=3)


def test_all_zero_channel_quantizes_to_zero():
    w = torch.zeros(2, 3)
    w[1] = 1.0
    out = fake_quantize_weight(w, 4)
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(3))


def test_unsigned_range_and_more_bits_less_error():
    assert qrange(8, signed=False) == (0, 255)
    assert qrange(4, signed=True) == (-7, 7)
    w = torch.randn(32, 64)
    errors = [quantization_error(w, b) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_ste_gradient_is_one_inside_and_zero_when_clamped():
    x = torch.tensor([-3.0, -0.74, 0.2, 0.49, 1.26, 5.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.5), -2, 2)  # representable range [-1, 1]
    assert torch.allclose(y, torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    z = torch.tensor([0.3, 2.7], requires_grad=True)
    (round_ste(z) * torch.tensor([2.0, 3.0])).sum().backward()
    assert torch.equal(z.grad, torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("bad", [1, 9, 0, 4.0, True])
def test_weight_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="from 2 to 8"):
        quantize_weight(torch.ones(2, 2), bad)


@pytest.mark.parametrize("scale", [torch.tensor(0.0371), torch.tensor([[0.02], [0.5], [1e-3]], dtype=torch.float64)])
def test_fake_quantize_without_a_graph_equals_the_ste_forward(scale):
    # evaluation takes an in-place path; its numbers must be the straight-through forward's, bit for bit,
    # ties (x / s = k + 0.5) and clamped values included
    torch.manual_seed(0)
    x = torch.cat([torch.randn(3, 500) * 3, (torch.arange(-9, 9).repeat(3, 1) + 0.5) * scale.float()], 1)
    with_graph = fake_quantize(x.clone().requires_grad_(), scale, -7, 7)
    with torch.no_grad():
        without = fake_quantize(x, scale, -7, 7)
    assert with_graph.dtype == without.dtype and torch.equal(with_graph.detach(), without)
    assert torch.equal(fake_quantize(x, scale, -7, 7), without)  # no grad needed: the same path
