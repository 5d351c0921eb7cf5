"""Exact integer convolution and matrix product.

The accumulation is exact integer arithmetic. Where a layer's static bound on every
partial sum (Σ|w| · max|x|) stays below 2^24 (or 2^53), the products run through the
float32 (float64) BLAS kernels, whose integer sums are then exact; otherwise an int64
im2col matrix product is used. ``kernel="int64"`` forces the all-integer path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXACT_FLOAT32 = 2**24
EXACT_FLOAT64 = 2**53
KERNELS = ("auto", "int64")


def choose_kernel(bound: int) -> str:
    """The fastest exact kernel for partial sums bounded by ``bound``."""
    if bound < EXACT_FLOAT32:
        return "float32"
    if bound < EXACT_FLOAT64:
        return "float64"
    return "int64"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv2d_int64(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    xp = F.pad(x, (pw, pw, ph, ph))
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    s = xp.stride()
    # cols[n, oy, ox, c, ky, kx] = xp[n, c, oy*sh + ky*dh, ox*sw + kx*dw]
    cols = xp.as_strided((n, oh, ow, c, kh, kw), (s[0], s[2] * sh, s[3] * sw, s[1], s[2] * dh, s[3] * dw))
    cols = cols.reshape(n * oh * ow, groups, cg * kh * kw).transpose(0, 1)  # [G, N·OH·OW, K]
    wg = w.reshape(groups, o // groups, cg * kh * kw).transpose(1, 2)  # [G, K, O/G]
    out = torch.bmm(cols, wg)  # [G, N·OH·OW, O/G]
    return out.transpose(0, 1).reshape(n, oh, ow, o).permute(0, 3, 1, 2).contiguous()


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int, kernel: str) -> torch.Tensor:
    """int64 accumulators of a convolution of int64 codes ``x`` with int64 codes ``w``."""
    if kernel == "int64":
        return _conv2d_int64(x, w, stride, padding, dilation, groups)
    dtype = torch.float32 if kernel == "float32" else torch.float64
    return F.conv2d(x.to(dtype), w.to(dtype), None, stride, padding, dilation, groups).round().to(torch.int64)


def linear(x: torch.Tensor, w: torch.Tensor, kernel: str) -> torch.Tensor:
    """int64 accumulators of x @ wᵀ for int64 codes."""
    if kernel == "int64":
        return x @ w.t()
    dtype = torch.float32 if kernel == "float32" else torch.float64
    return (x.to(dtype) @ w.to(dtype).t()).round().to(torch.int64)
