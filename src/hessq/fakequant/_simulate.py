"""Eval-mode arithmetic of a QuantizedModel: the integer model's computation, run on the live modules.

Every value in flight is a pair (integer codes, scale): the real value it stands for is
codes · scale, where scale broadcasts against the codes (per tensor, or per channel for
accumulators). Integer tensors are int64; convolutions use the exact kernels of
``hessq.quantizer._kernels`` (float BLAS only where a static bound proves the sums exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hessq._errors import HessqRuntimeError
from hessq.graph import QuantAdd, QuantCat, QuantConv2d, QuantLinear
from hessq.graph._pooling import average_pool_window
from hessq.quantizer import ActQuantizer, _kernels, dyadic, expand_scale, requantize
from hessq.quantizer._kernels import choose_kernel

@dataclass
class QValue:
    codes: torch.Tensor  # int64 codes, or a float tensor when scale is None
    scale: torch.Tensor | None  # float64, broadcastable to codes; None: a plain float tensor


def _as_channel(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel [C] scale shaped to broadcast on dim 1 of an ``ndim`` tensor."""
    if scale.dim() == 0:
        return scale
    return scale.reshape([1, -1] + [1] * (ndim - 2))


def _requant_to(v: QValue, q: ActQuantizer) -> torch.Tensor:
    """Codes of ``v`` on ``q``'s grid: round-to-nearest from float, dyadic from integers."""
    s_out = q.scale.double()
    if v.scale is None:
        return torch.clamp(torch.round(v.codes.double() / s_out), q.qmin, q.qmax).to(torch.int64)
    b, c = dyadic(v.scale / s_out)
    return requantize(v.codes, b, c, q.qmin, q.qmax)


def _layer(layer: QuantConv2d | QuantLinear, v: QValue) -> QValue:
    q_in = layer.act_quantizer
    if v.scale is None or q_in is None or not torch.equal(v.scale, q_in.scale.double()):
        raise RuntimeError("internal: a quantized layer's input is not on its input quantizer's grid")
    w, s_w = layer.integer_weight()
    acc_scale = expand_scale(s_w, torch.empty(layer.weight.shape[0]), 0) * v.scale  # [C] or []
    q = layer.act_quantizer
    kernel = choose_kernel(int(w.abs().flatten(1).sum(1).max()) * max(-q.qmin, q.qmax))
    if isinstance(layer, QuantConv2d):
        acc = _kernels.conv2d(v.codes, w, layer.stride, layer.padding, layer.dilation, layer.groups, kernel)
    else:
        acc = _kernels.linear(v.codes, w, kernel)
    bias = layer.integer_bias(v.scale)
    if bias is not None:
        acc = acc + _as_channel(bias, acc.dim())
    scale = _as_channel(acc_scale, acc.dim())
    return QValue(acc, scale)


def _full_scale(v: QValue) -> torch.Tensor:
    return v.scale.expand(v.codes.shape) if v.scale.dim() else v.scale


class _IntegerInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return getattr(self, n.op)(n.target, args, kwargs)

    def placeholder(self, target, args, kwargs):
        return QValue(super().placeholder(target, args, kwargs), None)

    def output(self, target, args, kwargs):
        v = args[0]
        if isinstance(v, QValue):
            return v.codes.double() * v.scale if v.scale is not None else v.codes
        return v

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if isinstance(m, ActQuantizer):
            return QValue(_requant_to(args[0], m), m.scale.double())
        if isinstance(m, (QuantConv2d, QuantLinear)):
            return _layer(m, args[0])
        if isinstance(m, QuantAdd):
            q = m.output_quantizer
            a, b = (_requant_to(QValue(v.codes, v.scale), _Unclamped(q)) for v in args)
            return QValue(torch.clamp(a + b, q.qmin, q.qmax), q.scale.double())
        if isinstance(m, QuantCat):
            return QValue(torch.cat([_requant_to(v, m.output_quantizer) for v in args], m.dim), m.output_quantizer.scale.double())
        return self._elementwise(m, args, kwargs)

    def call_function(self, target, args, kwargs):
        return self._elementwise(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        return self._elementwise(target, args, kwargs, method=True)

    def _elementwise(self, op, args, kwargs, method: bool = False) -> Any:
        v = args[0] if args else None
        if not isinstance(v, QValue):
            return getattr(v, op)(*args[1:], **kwargs) if method else op(*args, **kwargs)
        name = op if method else getattr(op, "__name__", type(op).__name__)
        rest = args[1:]
        if v.scale is None:  # still the float input, before its first quantizer
            out = getattr(v.codes, op)(*rest, **kwargs) if method else op(v.codes, *rest, **kwargs)
            return QValue(out, None) if isinstance(out, torch.Tensor) else out
        if isinstance(op, (nn.ReLU,)) or name == "relu":
            return QValue(v.codes.clamp(min=0), v.scale)
        if isinstance(op, nn.ReLU6) or name == "relu6":
            six = torch.floor(6.0 / _full_scale(v) + 0.5).to(torch.int64)
            return QValue(torch.minimum(v.codes.clamp(min=0), six), v.scale)
        if isinstance(op, (nn.Dropout, nn.Identity)) or name in ("dropout", "contiguous"):
            return v
        if isinstance(op, nn.ZeroPad2d):  # code 0 is the real value 0 on every grid
            return QValue(F.pad(v.codes, op.padding), v.scale)
        if isinstance(op, nn.MaxPool2d):
            return QValue(F.max_pool2d(v.codes, op.kernel_size, op.stride, op.padding, op.dilation, op.ceil_mode), v.scale)
        if name == "max_pool2d":
            return QValue(F.max_pool2d(v.codes, *rest, **kwargs), v.scale)
        if isinstance(op, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) or name in ("adaptive_avg_pool2d", "avg_pool2d"):
            return _sum_pool(op, v, rest, kwargs)
        if name == "mean":
            dims = rest[0] if rest else kwargs.get("dim")
            dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
            keepdim = rest[1] if len(rest) > 1 else kwargs.get("keepdim", False)
            count = 1
            for d in dims:
                count *= v.codes.shape[d]
            scale = v.scale
            if scale.dim():
                full = _full_scale(v)
                scale = full.amax(dims, keepdim=keepdim)
                if not torch.equal(scale, full.amin(dims, keepdim=keepdim)):
                    raise HessqRuntimeError("a mean across channels with different scales has no integer form")
            return QValue(v.codes.sum(dims, keepdim=keepdim), scale / count)
        # shape-only ops: apply to the codes and to the scale expanded to the same shape
        if isinstance(op, nn.Flatten):
            fn = op
        elif method:
            fn = lambda t: getattr(t, op)(*rest, **kwargs)  # noqa: E731
        else:
            fn = lambda t: op(t, *rest, **kwargs)  # noqa: E731
        if name in ("size", "dim") or op is getattr:
            return fn(v.codes)
        codes = fn(v.codes)
        scale = v.scale if v.scale.dim() == 0 else fn(_full_scale(v).contiguous())
        return QValue(codes, scale)


class _Unclamped:
    """A quantizer's grid without its clamp: residual branches are clamped only after the add."""

    def __init__(self, q: ActQuantizer) -> None:
        self.scale, self.qmin, self.qmax = q.scale, -(2**62), 2**62


def _sum_pool(op, v: QValue, rest, kwargs) -> QValue:
    """Average pooling as an integer window sum; the 1/N goes into the scale (a dyadic divide later)."""
    try:
        kernel, stride = average_pool_window(op, rest, kwargs, *v.codes.shape[-2:])
    except ValueError as exc:
        raise HessqRuntimeError(f"{exc} has no integer form") from None
    count = kernel[0] * kernel[1]
    summed = torch.round(F.avg_pool2d(v.codes.double(), kernel, stride) * count).to(torch.int64)
    return QValue(summed, v.scale / count)


@torch.no_grad()
def simulate_integer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``model``'s graph with integer codes and dyadic requantization; returns float32 outputs."""
    out = _IntegerInterpreter(model.graph_module).run(x)
    return out.to(x.dtype if x.is_floating_point() else torch.float32)
