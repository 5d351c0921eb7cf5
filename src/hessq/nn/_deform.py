"""Deformable convolution in plain PyTorch (CoDeNet's variants): the float modules and their cost.

Layout and pixel convention are ONNX ``DeformConv``'s (opset 19): the offsets are a tensor
[N, 2·kh·kw, H_out, W_out] holding one (dy, dx) pair per kernel tap, taps in row-major order;
tap (i, j) of output pixel (y, x) samples the input at

    (y·stride − pad + i·dilation + dy,  x·stride − pad + j·dilation + dx)

bilinearly, reading zero outside the image. The conv is then a matmul over the sampled columns.

CoDeNet's hardware-friendly variants are options of one module:

- ``offset_bound=b``: every offset clamped to [−b, b] (the references use 8);
- ``square=True``: the offset branch gives one scalar per output pixel, s = clamp(·, 0, 8), and tap
  (i, j) moves by (ci·dilation·s, cj·dilation·s) with ci = i − (kh−1)/2, cj = j − (kw−1)/2 its place
  relative to the centre: the fixed k×k template scaled by 1 + s, i.e. an adaptive dilation
  dilation·(1 + s) (a 3×3 kernel's corner tap samples at (±(1+s), ±(1+s)) for dilation 1);
- ``round_offsets=True``: the offsets (for ``square``, the scalar s, so the dilation stays an
  integer) rounded half up, ⌊o + ½⌋, with a straight-through gradient in training: the sampling
  becomes a gather of input pixels, which is what the integer model runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError

#: CoDeNet's largest square scale: s ∈ [0, SQUARE_MAX].
SQUARE_MAX = 8.0

#: Sampled elements (batch · channels · taps · output pixels) per chunk of the batch: bounds the memory
#: of the four gathered corner tensors (~4 × 4 bytes each) on a large input.
_CHUNK_ELEMENTS = 1 << 25


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def round_half_up(t: torch.Tensor) -> torch.Tensor:
    """⌊t + ½⌋ with a straight-through gradient (the integer model rounds the same way)."""
    return t + (torch.floor(t + 0.5) - t).detach()


def square_offsets(scale: torch.Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Per-tap (dy, dx) offsets [N, 2·kh·kw, H, W] of the square template scaled by ``scale`` [N, 1, H, W]."""
    kh, kw = kernel_size
    ci = (torch.arange(kh, dtype=scale.dtype, device=scale.device) - (kh - 1) / 2) * dilation[0]
    cj = (torch.arange(kw, dtype=scale.dtype, device=scale.device) - (kw - 1) / 2) * dilation[1]
    dy = ci.view(kh, 1).expand(kh, kw).reshape(-1)
    dx = cj.view(1, kw).expand(kh, kw).reshape(-1)
    template = torch.stack([dy, dx], dim=1).reshape(1, 2 * kh * kw, 1, 1)
    return template * scale


def limit_branch(raw: torch.Tensor, offset_bound: float | None, square: bool) -> torch.Tensor:
    """The offset branch's output clamped to ±``offset_bound`` and, for ``square``, to the scale's [0, 8]."""
    if offset_bound is not None:
        raw = raw.clamp(-offset_bound, offset_bound)
    return raw.clamp(0.0, SQUARE_MAX) if square else raw


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def tap_positions(
    offsets: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) [N, taps, H_out, W_out] each tap samples: its place in the regular grid plus its offset."""
    n, _, oh, ow = offsets.shape
    kh, kw = kernel_size
    taps, dev = kh * kw, offsets.device
    base_y = (torch.arange(oh, device=dev, dtype=dtype) * stride[0] - padding[0]).view(1, oh, 1) + (
        torch.arange(kh, device=dev, dtype=dtype) * dilation[0]).repeat_interleave(kw).view(taps, 1, 1)
    base_x = (torch.arange(ow, device=dev, dtype=dtype) * stride[1] - padding[1]).view(1, 1, ow) + (
        torch.arange(kw, device=dev, dtype=dtype) * dilation[1]).repeat(kh).view(taps, 1, 1)
    off = offsets.reshape(n, taps, 2, oh, ow).to(dtype)
    return base_y.unsqueeze(0) + off[:, :, 0], base_x.unsqueeze(0) + off[:, :, 1]


class _GatherAtIntegers(torch.autograd.Function):
    """Sampling at integer positions: a gather forwards (exact: no interpolation weights), and backwards the
    gradient bilinear interpolation has there (the straight-through estimator of rounded offsets): ∂/∂row is
    x[row + 1] − x[row], ∂/∂col is x[col + 1] − x[col], zero outside the image."""

    @staticmethod
    def _index(rows: torch.Tensor, cols: torch.Tensor, h: int, w: int, c: int) -> torch.Tensor:
        # positions in the image padded by one zero pixel, clamped onto its border: outside reads zero
        index = (rows.long() + 1).clamp(0, h + 1) * (w + 2) + (cols.long() + 1).clamp(0, w + 1)
        n = index.shape[0]
        return index.reshape(n, 1, -1).expand(n, c, index[0].numel())

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, c, h, w = x.shape
        padded = F.pad(x, (1, 1, 1, 1)).reshape(n, c, -1)
        ctx.save_for_backward(padded, rows, cols)
        ctx.image = (h, w)
        return torch.gather(padded, 2, _GatherAtIntegers._index(rows, cols, h, w, c))  # [N, C, taps·H_out·W_out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        padded, rows, cols = ctx.saved_tensors
        (h, w), (n, c) = ctx.image, padded.shape[:2]
        index = _GatherAtIntegers._index(rows, cols, h, w, c)
        grad_x = grad_r = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(padded).scatter_add_(2, index, grad)
            grad_x = grad_x.reshape(n, c, h + 2, w + 2)[:, :, 1:-1, 1:-1]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            here = torch.gather(padded, 2, index)

            def slope(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
                step = torch.gather(padded, 2, _GatherAtIntegers._index(r, q, h, w, c)) - here
                return (grad * step).sum(1).reshape(rows.shape)

            grad_r = slope(rows + 1, cols) if ctx.needs_input_grad[1] else None
            grad_c = slope(rows, cols + 1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_r, grad_c


def sample_columns(
    x: torch.Tensor,
    offsets: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    integer_offsets: bool = False,
) -> torch.Tensor:
    """The deformed im2col: [N, C·kh·kw, H_out, W_out], channel c·kh·kw + tap, sampled bilinearly (zero outside).

    Fractional offsets go through ``grid_sample`` (one fused kernel forwards and backwards: the gradient reaches
    ``x`` and the offsets); ``integer_offsets`` (offsets holding whole numbers) take an exact gather instead.
    """
    n, c, h, w = x.shape
    taps = kernel_size[0] * kernel_size[1]
    oh, ow = offsets.shape[-2:]
    rows, cols = tap_positions(offsets, kernel_size, stride, padding, dilation, x.dtype)
    if integer_offsets:
        return _GatherAtIntegers.apply(x, rows, cols).reshape(n, c * taps, oh, ow)
    # pixel centres at (2i + 1)/size − 1 in grid_sample's coordinates (align_corners=False); zeros outside
    grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], dim=-1).reshape(n, taps * oh, ow, 2)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.reshape(n, c * taps, oh, ow)


def deform_conv2d(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    integer_offsets: bool = False,
) -> torch.Tensor:
    """Deformable conv (ONNX ``DeformConv`` semantics, one offset group) of ``x`` [N, C, H, W] with
    ``offsets`` [N, 2·kh·kw, H_out, W_out] and ``weight`` [O, C/groups, kh, kw]. ``integer_offsets``: the
    offsets hold whole numbers (rounded), sampled by an exact gather."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out_ch, _, kh, kw = weight.shape
    n, c, h, w = x.shape
    oh = output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = output_size(w, kw, stride[1], padding[1], dilation[1])
    if tuple(offsets.shape) != (n, 2 * kh * kw, oh, ow):
        raise ConfigError(f"offsets must be shaped [N, 2·kh·kw, H_out, W_out] = {[n, 2 * kh * kw, oh, ow]}, "
                          f"got {list(offsets.shape)}")
    flat_weight = weight.reshape(out_ch, -1, 1, 1)
    per_image = c * kh * kw * oh * ow
    step = max(1, _CHUNK_ELEMENTS // max(per_image, 1))
    outs = []
    for start in range(0, n, step):
        cols = sample_columns(x[start:start + step], offsets[start:start + step], (kh, kw), stride, padding, dilation,
                              integer_offsets)
        # grouped 1×1 conv: the columns of group g are channels g·(C/groups)·k² onward, as the weight's rows
        outs.append(F.conv2d(cols, flat_weight, bias, groups=groups))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class DeformConv2d(nn.Module):
    """A deformable 2-D convolution owning its offset branch (CoDeNet's variants as options; see the module doc).

    ``self.offset`` is the offset branch, an ``nn.Conv2d(in_channels, 2·k·k (1 when square), kernel_size,
    stride, padding, dilation)`` initialised to zero, so a new layer equals a regular conv; ``weight``
    [out, in/groups, k, k] and ``bias`` are the main conv's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        offset_bound: float | None = None,
        square: bool = False,
        round_offsets: bool = False,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ConfigError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                              f"groups ({groups})")
        if offset_bound is not None and not (math.isfinite(offset_bound) and offset_bound > 0):
            raise ConfigError(f"offset_bound must be a positive number of pixels or None, got {offset_bound!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        if square and (self.kernel_size[0] % 2 == 0 or self.kernel_size[1] % 2 == 0):
            raise ConfigError(f"the square template is centred: it needs an odd kernel size, got {self.kernel_size}")
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.offset_bound = None if offset_bound is None else float(offset_bound)
        self.square, self.round_offsets = bool(square), bool(round_offsets)
        kh, kw = self.kernel_size
        self.offset = nn.Conv2d(in_channels, 1 if square else 2 * kh * kw, self.kernel_size, self.stride, self.padding,
                                self.dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # the same initialisation as nn.Conv2d
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def offsets_from_branch(self, raw: torch.Tensor) -> torch.Tensor:
        """The per-tap offsets [N, 2·k·k, H_out, W_out] from the offset branch's output (bound, square, rounding)."""
        limited = limit_branch(raw, self.offset_bound, self.square)
        if self.round_offsets:
            limited = round_half_up(limited)
        return square_offsets(limited, self.kernel_size, self.dilation) if self.square else limited

    def compute_offsets(self, x: torch.Tensor) -> torch.Tensor:
        """The offsets this layer samples ``x`` at."""
        return self.offsets_from_branch(self.offset(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return deform_conv2d(x, self.compute_offsets(x), self.weight, self.bias, self.stride, self.padding,
                             self.dilation, self.groups, integer_offsets=self.round_offsets)

    def extra_repr(self) -> str:
        extras = [f"offset_bound={self.offset_bound}" if self.offset_bound is not None else "",
                  "square=True" if self.square else "", "round_offsets=True" if self.round_offsets else ""]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
                + "".join(f", {e}" for e in extras if e))


def deform_macs(module: DeformConv2d, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates of one call on an input of ``input_shape`` ([N, C, H, W]), by part: ``main`` (the
    deformed conv), ``offset`` (the offset branch), ``sampling`` (bilinear interpolation, 4 per sampled value;
    0 with rounded offsets, a gather) and ``total`` (all three)."""
    n, _, h, w = input_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    pixels = output_size(h, kh, sh, ph, dh) * output_size(w, kw, sw, pw, dw)
    main = n * pixels * module.out_channels * module.weight[0].numel()
    offset = n * pixels * module.offset.out_channels * module.offset.weight[0].numel()
    sampling = 0 if module.round_offsets else 4 * n * pixels * module.in_channels * kh * kw
    return {"main": main, "offset": offset, "sampling": sampling, "total": main + offset + sampling}


#: The CoDeNet ablation's block variants, cheapest last.
VARIANTS = ("conv", "full", "depthwise", "bounded", "square", "square_rounded")


def deform_block(variant: str, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """One block of CoDeNet's ablation, from ``in_channels`` to ``out_channels``:

    ``"conv"`` a 1×1 pointwise conv then a regular 3×3 depthwise conv (no deformation); ``"full"`` a regular
    3×3 deformable conv; ``"depthwise"`` a 1×1 pointwise conv then a 3×3 depthwise deformable conv;
    ``"bounded"`` the same with offsets clamped to ±8; ``"square"`` the same with the square template;
    ``"square_rounded"`` square with the scale rounded to an integer (integer-only inference).
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown deformable block variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant == "full":
        return DeformConv2d(in_channels, out_channels, 3, stride, 1)
    pointwise = nn.Conv2d(in_channels, out_channels, 1)
    if variant == "conv":
        return nn.Sequential(pointwise, nn.Conv2d(out_channels, out_channels, 3, stride, 1, groups=out_channels))
    options = {"depthwise": {}, "bounded": {"offset_bound": 8.0}, "square": {"square": True},
               "square_rounded": {"square": True, "round_offsets": True}}[variant]
    return nn.Sequential(pointwise, DeformConv2d(out_channels, out_channels, 3, stride, 1, groups=out_channels, **options))
