"""Reading an average pooling's window from its module or call, for the integer forms."""

from __future__ import annotations

from typing import Any

from torch import nn

from hessq._errors import ConfigError


def average_pool_window(op: Any, args: tuple, kwargs: dict, height: int, width: int) -> tuple[list[int], list[int]]:
    """(kernel, stride) of an AvgPool2d / AdaptiveAvgPool2d module or functional call on an H×W input.

    Raises ValueError when the pooling has no integer window sum: adaptive pooling with
    unequal windows, or padding.
    """
    adaptive = isinstance(op, nn.AdaptiveAvgPool2d) or getattr(op, "__name__", "") == "adaptive_avg_pool2d"
    if adaptive:
        out = op.output_size if isinstance(op, nn.Module) else (args[0] if args else kwargs["output_size"])
        oh, ow = (out, out) if isinstance(out, int) else (out[0] or height, out[1] or width)
        if height % oh or width % ow:
            raise ConfigError(f"adaptive average pooling from {height}×{width} to {oh}×{ow} (unequal windows)")
        return [height // oh, width // ow], [height // oh, width // ow]
    if isinstance(op, nn.Module):
        kernel, stride, padding = op.kernel_size, op.stride or op.kernel_size, op.padding
    else:
        kernel = args[0] if args else kwargs["kernel_size"]
        stride = (args[1] if len(args) > 1 else kwargs.get("stride")) or kernel
        padding = args[2] if len(args) > 2 else kwargs.get("padding", 0)
    if padding not in (0, (0, 0), [0, 0]):
        raise ConfigError("average pooling with padding")

    def pair(v: Any) -> list[int]:
        return [v, v] if isinstance(v, int) else list(v)

    return pair(kernel), pair(stride)
