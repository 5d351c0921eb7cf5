"""Pooling on codes: max-pool keeps the grid; average pools and means are integer sums whose 1/N goes
into the scale (a dyadic divide at the next requantization)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.ops._registry import QuantOp, register

_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _named(node, names: tuple[str, ...]) -> dict[str, Any]:
    """The call's arguments after the input, by name."""
    out = dict(zip(names, node.args[1:]))
    out.update({k: v for k, v in node.kwargs.items() if k in names})
    return out


def _pair(v: Any) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


@register
class MaxPool2d(QuantOp):
    name = "max_pool2d"
    modules = (nn.MaxPool2d,)
    functions = (F.max_pool2d, torch.max_pool2d)
    canonical = F.max_pool2d
    kinds = ("max_pool2d",)
    keeps_grid = True

    def canonical_call(self, node, module):
        if module is not None:
            if module.return_indices:
                return None
            p = {k: getattr(module, k) for k in _MAX_POOL_ARGS}
        else:
            if node.kwargs.get("return_indices") or (len(node.args) > 6 and node.args[6]):
                return None
            p = _named(node, _MAX_POOL_ARGS)
        return (node.args[0],), p

    def compile(self, program, node, op, args, kwargs):
        v = args[0]
        p = {k: (list(x) if isinstance(x, tuple) else x) for k, x in kwargs.items()}
        dummy = F.max_pool2d(v.dummy.double(), **p).to(v.dummy.dtype)
        return program.emit(node.name, "max_pool2d", [v], dummy, v.scale, v.qmax, p)

    def execute(self, op, inputs, kernel):
        return F.max_pool2d(inputs[0], **op.attrs)

    def onnx(self, ex, op, ins):
        a = op.attrs
        attrs = dict(kernel_shape=_pair(a["kernel_size"]), strides=_pair(a.get("stride") or a["kernel_size"]),
                     pads=_pair(a.get("padding", 0)) * 2, dilations=_pair(a.get("dilation", 1)),
                     ceil_mode=int(bool(a.get("ceil_mode", False))))
        t = ins[0]
        return ex.tensor(ex.node("MaxPool", [t.name], "maxpool", **attrs), t.kind, t.scale, t.zero_point)


def average_pool_window(op: Any, kwargs: dict, height: int, width: int) -> tuple[list[int], list[int]]:
    """(kernel, stride) of a canonical average-pool call on an H×W input; a ConfigError when it has no
    integer window sum (adaptive pooling with unequal windows, or padding)."""
    if op is F.adaptive_avg_pool2d:
        out = kwargs["output_size"]
        oh, ow = (out, out) if isinstance(out, int) else (out[0] or height, out[1] or width)
        if height % oh or width % ow:
            raise ConfigError(f"adaptive average pooling from {height}×{width} to {oh}×{ow} (unequal windows)")
        return [height // oh, width // ow], [height // oh, width // ow]
    if kwargs.get("padding", 0) not in (0, (0, 0), [0, 0]):
        raise ConfigError("average pooling with padding")
    kernel = kwargs["kernel_size"]
    return _pair(kernel), _pair(kwargs.get("stride") or kernel)


@register
class AvgPool2d(QuantOp):
    """Average pooling as an integer window sum."""

    name = "avg_pool2d"
    modules = (nn.AvgPool2d,)
    functions = (F.avg_pool2d,)
    canonical = F.avg_pool2d
    kinds = ("sum_pool2d",)
    averaging = True
    _args = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

    def canonical_call(self, node, module):
        if module is not None:
            return (node.args[0],), {k: getattr(module, k) for k in self._args}
        return (node.args[0],), _named(node, self._args)

    def compile(self, program, node, op, args, kwargs):
        v = args[0]
        if v.scale is None:
            program.fail(node, "average pooling of a float input")
        try:
            kernel, stride = average_pool_window(op, kwargs, *v.dummy.shape[-2:])
        except ConfigError as exc:
            program.fail(node, str(exc))
        count = kernel[0] * kernel[1]
        dummy = F.avg_pool2d(v.dummy.double(), kernel, stride).to(torch.int64)
        return program.emit(node.name, "sum_pool2d", [v], dummy, v.scale / count, v.qmax * count, {"kernel": kernel, "stride": stride})

    def execute(self, op, inputs, kernel):
        # an integer window sum: pad-free windows, summed by unfolding
        (kh, kw), (sh, sw) = op.attrs["kernel"], op.attrs["stride"]
        return inputs[0].unfold(2, kh, sh).unfold(3, kw, sw).sum((-1, -2))

    def onnx(self, ex, op, ins):
        # ONNX Runtime has no float64 AveragePool; in float32 a window sum of 8-bit codes
        # (< 2^24) survives the average and the multiply back exactly after rounding.
        k = op.attrs["kernel"]
        if 256 * k[0] * k[1] >= 2**23:
            raise ConfigError(f"a {k[0]}×{k[1]} pooling window is too large for the exact ONNX export")
        f32 = ex.node("Cast", [ex.acc(ins[0])], "pool_in", to=ex.TP.FLOAT)
        avg = ex.node("AveragePool", [f32], "avgpool", kernel_shape=k, strides=op.attrs["stride"])
        summed = ex.node("Round", [ex.node("Mul", [avg, ex.const("count", np.float32(k[0] * k[1]))], "times_n")], "window_sum")
        return ex.tensor(ex.node("Cast", [summed], "window_sum_f64", to=ex.TP.DOUBLE), "acc")

    def onnx_fast(self, ex, op, ins):
        t = ins[0]
        shape = ex.model_shapes.get(op.inputs[0])
        if t.kind == "codes" and shape is not None and list(op.attrs["kernel"]) == list(shape[-2:]):
            # a global average pool on int8 codes (com.microsoft QLinearGlobalAveragePool), written straight
            # onto the grid of the requantize that follows when there is one
            req = ex.requantize_after(op)
            y = ex.tensor("", "codes", float(req.scale) if req is not None else t.scale,
                          (128 if req.attrs["qmin"] < 0 else 0) if req is not None else t.zero_point)
            y.name = ex.node("QLinearGlobalAveragePool", [t.name, *ex.scale_zp(t), *ex.scale_zp(y)], "qgap",
                             domain="com.microsoft", channels_last=0)
            ex.uses_ms_domain = True
            return y  # the requantize after it (past any flatten) finds its codes already on its grid
        # the real value of (window sum · s/N) is the float average of the real inputs
        avg = ex.node("AveragePool", [ex.real(t)], "avgpool", kernel_shape=op.attrs["kernel"], strides=op.attrs["stride"])
        return ex.tensor(avg, "real")


@register
class AdaptiveAvgPool2d(AvgPool2d):
    """Adaptive average pooling with equal windows: the same integer window sum."""

    name = "adaptive_avg_pool2d"
    modules = (nn.AdaptiveAvgPool2d,)
    functions = (F.adaptive_avg_pool2d,)
    canonical = F.adaptive_avg_pool2d
    kinds = ()  # emits sum_pool2d, which AvgPool2d executes and exports

    def canonical_call(self, node, module):
        size = module.output_size if module is not None else _named(node, ("output_size",)).get("output_size")
        return (node.args[0],), {"output_size": size}


@register
class Mean(QuantOp):
    """A mean over dimensions: an integer sum, 1/N into the scale."""

    name = "mean"
    functions = (torch.mean,)
    methods = ("mean",)
    canonical = torch.mean
    kinds = ("sum",)
    averaging = True

    def canonical_call(self, node, module):
        p = _named(node, ("dim", "keepdim"))
        if "dim" not in p or node.kwargs.get("dtype") is not None:
            return None
        return (node.args[0], p["dim"]), {"keepdim": bool(p.get("keepdim", False))}

    def compile(self, program, node, op, args, kwargs):
        v = args[0]
        if len(args) < 2 or v.scale is None:
            program.fail(node, "a mean of a float input or over every dimension")
        dims = list(args[1]) if isinstance(args[1], (tuple, list)) else [args[1]]
        keepdim = bool(kwargs.get("keepdim", False))
        count = 1
        for d in dims:
            count *= v.dummy.shape[d]
        scale = v.scale
        if scale.dim():
            full = v.scale.expand(v.dummy.shape)
            scale = full.amax(dims, keepdim=keepdim)
            if not torch.equal(scale, full.amin(dims, keepdim=keepdim)):
                program.fail(node, "a mean across channels with different scales")
        dummy = v.dummy.sum(dims, keepdim=keepdim)
        return program.emit(node.name, "sum", [v], dummy, scale / count, v.qmax * count, {"dims": dims, "keepdim": keepdim})

    def execute(self, op, inputs, kernel):
        return inputs[0].sum(op.attrs["dims"], keepdim=op.attrs["keepdim"])

    def onnx(self, ex, op, ins):
        axes = ex.const("axes", np.array(op.attrs["dims"], np.int64))
        return ex.tensor(ex.node("ReduceSum", [ex.acc(ins[0]), axes], "sum", keepdims=int(op.attrs["keepdim"])), "acc")

    def onnx_fast(self, ex, op, ins):
        # ReduceMean takes its axes as an attribute until opset 18
        out = ex.node("ReduceMean", [ex.real(ins[0])], "mean", axes=list(op.attrs["dims"]), keepdims=int(op.attrs["keepdim"]))
        return ex.tensor(out, "real")
