"""hessq.nn.DeformConv2d: the float deformable conv against references computed another way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.nn import VARIANTS, DeformConv2d, deform_block, deform_conv2d, deform_macs


def _reference(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups):
    """Deformable conv by loops over output pixels and taps, bilinear by its definition (zero outside)."""
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    oh, ow = offsets.shape[-2:]

    def pixel(b, ch, yy, xx):
        return x[b, ch, yy, xx] if 0 <= yy < h and 0 <= xx < w else x.new_zeros(())

    out = x.new_zeros(n, o, oh, ow)
    for b in range(n):
        for y in range(oh):
            for xo in range(ow):
                cols = x.new_zeros(c, kh * kw)
                for t in range(kh * kw):
                    i, j = divmod(t, kw)
                    py = y * stride - padding + i * dilation + float(offsets[b, 2 * t, y, xo])
                    px = xo * stride - padding + j * dilation + float(offsets[b, 2 * t + 1, y, xo])
                    y0, x0 = int(torch.floor(torch.tensor(py))), int(torch.floor(torch.tensor(px)))
                    ay, ax = py - y0, px - x0
                    for ch in range(c):
                        cols[ch, t] = ((1 - ay) * (1 - ax) * pixel(b, ch, y0, x0) + (1 - ay) * ax * pixel(b, ch, y0, x0 + 1)
                                       + ay * (1 - ax) * pixel(b, ch, y0 + 1, x0) + ay * ax * pixel(b, ch, y0 + 1, x0 + 1))
                for oc in range(o):
                    g = oc // (o // groups)
                    out[b, oc, y, xo] = (weight[oc].reshape(cg, -1) * cols[g * cg:(g + 1) * cg]).sum()
    return out


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 1, 1, 2), (1, 2, 2, 4)])
def test_zero_offsets_equal_a_regular_conv(stride, padding, dilation, groups):
    m = DeformConv2d(4, 8, 3, stride, padding, dilation, groups)
    x = torch.randn(2, 4, 9, 10)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, stride, padding, dilation, groups), rtol=1e-5, atol=1e-5)


def test_zero_offsets_depthwise_block_equals_its_regular_conv_block():
    deform = deform_block("depthwise", 5, 6)
    plain = deform_block("conv", 5, 6)
    plain[0].load_state_dict(deform[0].state_dict())
    plain[1].weight.data.copy_(deform[1].weight)
    plain[1].bias.data.copy_(deform[1].bias)
    x = torch.randn(2, 5, 12, 12)
    torch.testing.assert_close(deform(x), plain(x), rtol=1e-5, atol=1e-5)


def test_constant_integer_offsets_equal_a_shifted_input():
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    dy, dx = 2, -3
    offsets = torch.zeros(2, 18, 10, 9, dtype=torch.float64)
    offsets[:, 0::2], offsets[:, 1::2] = dy, dx
    padded = F.pad(x, (1, 1, 1, 1))  # the conv's padding, then the shift: shifted[y, x] = padded[y + dy, x + dx]
    shifted = torch.zeros_like(padded)
    shifted[:, :, : 12 - dy, -dx:] = padded[:, :, dy:, : 11 + dx]
    expected = F.conv2d(shifted, weight, None, 1, 0, 1, 3)
    torch.testing.assert_close(deform_conv2d(x, offsets, weight, None, 1, 1, 1, 3), expected, rtol=0, atol=1e-12)


def test_per_pixel_integer_offsets_gather_the_input_exactly():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-50, 50, (1, 4, 7, 8), generator=g).double()
    weight = torch.randint(-7, 8, (4, 2, 3, 3), generator=g).double()
    offsets = torch.randint(-9, 10, (1, 18, 4, 4), generator=g).double()  # reaches outside the image too
    expected = _reference(x, offsets, weight, 2, 1, 1, 2)
    assert torch.equal(deform_conv2d(x, offsets, weight, None, 2, 1, 1, 2, integer_offsets=True), expected)  # exact
    torch.testing.assert_close(deform_conv2d(x, offsets, weight, None, 2, 1, 1, 2), expected, rtol=1e-9, atol=1e-9)


def test_integer_sampling_has_the_bilinear_gradient_just_right_of_the_integers():
    # the straight-through gradient of rounded offsets is bilinear interpolation's slope on [p, p + 1)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 1, 3, 3, generator=g, dtype=torch.float64)
    offsets = torch.randint(-4, 5, (2, 18, 6, 7), generator=g).double()
    grads = []
    for shift, integer in ((0.0, True), (1e-7, False)):
        xi, oi = x.clone().requires_grad_(), (offsets + shift).requires_grad_()
        (deform_conv2d(xi, oi, weight, None, 1, 1, 1, 3, integer_offsets=integer) ** 2).sum().backward()
        grads.append((xi.grad, oi.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)
    assert grads[0][1].abs().sum() > 0


def test_fractional_offsets_interpolate_bilinearly():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    offsets = 4 * torch.rand(2, 18, 6, 7, generator=g, dtype=torch.float64) - 2
    torch.testing.assert_close(deform_conv2d(x, offsets, weight, None, 1, 1, 1, 1),
                               _reference(x, offsets, weight, 1, 1, 1, 1), rtol=1e-10, atol=1e-10)


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    # fractional positions away from integers, where bilinear sampling is differentiable
    offsets = (torch.randint(-2, 3, (1, 18, 5, 5), generator=g) + 0.25 + 0.5 * torch.rand(1, 18, 5, 5, generator=g,
               dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, o, w: deform_conv2d(a, o, w, None, 1, 1, 1, 2), (x, offsets, weight))


@pytest.mark.parametrize("options", [{}, {"offset_bound": 8.0}, {"square": True}])
def test_gradient_reaches_weights_and_offset_branch(options):
    m = DeformConv2d(3, 3, 3, 1, 1, groups=3, **options)
    nn.init.normal_(m.offset.weight, std=0.1)
    nn.init.constant_(m.offset.bias, 0.3)
    m(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert m.weight.grad.abs().sum() > 0 and m.bias.grad.abs().sum() > 0
    assert m.offset.weight.grad.abs().sum() > 0 and m.offset.bias.grad.abs().sum() > 0


def test_rounded_offsets_are_integers_with_a_straight_through_gradient():
    m = DeformConv2d(2, 2, 3, groups=2, round_offsets=True)
    nn.init.normal_(m.offset.weight, std=1.0)
    x = torch.randn(1, 2, 6, 6)
    raw = m.offset(x)
    offsets = m.compute_offsets(x)
    assert torch.equal(offsets, torch.floor(raw + 0.5))
    m(x).sum().backward()
    assert m.offset.weight.grad.abs().sum() > 0


def test_bounded_and_square_offsets_respect_their_limits():
    x = torch.randn(2, 3, 9, 9)
    bounded = DeformConv2d(3, 3, 3, groups=3, offset_bound=8)
    nn.init.normal_(bounded.offset.weight, std=30.0)
    raw = bounded.offset(x)
    assert raw.abs().max() > 8  # the branch asks for more than the bound
    offsets = bounded.compute_offsets(x)
    assert offsets.abs().max() == 8 and torch.equal(offsets, raw.clamp(-8, 8))

    for rounded in (False, True):
        square = DeformConv2d(3, 3, 3, groups=3, square=True, round_offsets=rounded)
        nn.init.normal_(square.offset.weight, std=30.0)
        s = square.offset(x)
        assert s.shape[1] == 1 and s.min() < 0 and s.max() > 8
        scale = s.clamp(0, 8)
        if rounded:
            scale = torch.floor(scale + 0.5)
        offsets = square.compute_offsets(x).reshape(2, 9, 2, 9, 9)
        # tap (i, j) moves by ((i - 1)·s, (j - 1)·s): the template scaled by 1 + s
        for t in range(9):
            i, j = divmod(t, 3)
            assert torch.equal(offsets[:, t, 0], (i - 1) * scale[:, 0])
            assert torch.equal(offsets[:, t, 1], (j - 1) * scale[:, 0])
        assert offsets.abs().max() <= 8


def test_square_scale_is_an_adaptive_dilation():
    # a constant integer scale s makes the layer a regular conv with dilation 1 + s (padding 1 + s keeps the size)
    m = DeformConv2d(2, 2, 3, 1, 1, groups=2, square=True, round_offsets=True)
    nn.init.constant_(m.offset.bias, 2.3)
    x = torch.randn(1, 2, 11, 11)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, 1, 3, 3, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocks_are_convs_and_deformable_convs(variant):
    block = deform_block(variant, 4, 6, stride=2)
    leaves = [m for m in block.modules() if not list(m.children()) or isinstance(m, DeformConv2d)]
    assert all(isinstance(m, (nn.Conv2d, DeformConv2d)) for m in leaves)
    assert block(torch.randn(1, 4, 16, 16)).shape == (1, 6, 8, 8)
    deform = [m for m in block.modules() if isinstance(m, DeformConv2d)]
    assert len(deform) == (0 if variant == "conv" else 1)
    if deform:
        m = deform[0]
        assert (m.groups == 1) == (variant == "full")
        assert (m.offset_bound == 8) == (variant == "bounded")
        assert m.square == variant.startswith("square") and m.round_offsets == (variant == "square_rounded")


def test_macs_count_the_main_conv_the_offset_branch_and_the_sampling():
    m = DeformConv2d(8, 8, 3, 2, 1, groups=8)
    macs = deform_macs(m, (2, 8, 16, 16))
    pixels = 2 * 8 * 8
    assert macs["main"] == pixels * 8 * 9 and macs["offset"] == pixels * 18 * 8 * 9
    assert macs["sampling"] == 4 * pixels * 8 * 9
    assert macs["total"] == macs["main"] + macs["offset"] + macs["sampling"]
    assert deform_macs(DeformConv2d(8, 8, 3, groups=8, square=True, round_offsets=True), (1, 8, 4, 4)) == {
        "main": 16 * 72, "offset": 16 * 72, "sampling": 0, "total": 32 * 72}


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="variant"):
        deform_block("dilated", 4, 4)
    with pytest.raises(ConfigError, match="offset_bound"):
        DeformConv2d(4, 4, offset_bound=-1)
    with pytest.raises(ConfigError, match="divisible"):
        DeformConv2d(4, 6, groups=4)
    with pytest.raises(ConfigError, match="offsets must be shaped"):
        deform_conv2d(torch.randn(1, 2, 5, 5), torch.zeros(1, 18, 4, 4), torch.randn(2, 2, 3, 3), padding=1)
