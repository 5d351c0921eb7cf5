"""Compiling a calibrated QuantizedModel into an integer program.

The program is a list of :class:`Op`, each reading named values and writing one. Every
integer value carries its scale (``Op.scale``, float64, broadcastable): the real number
it stands for is codes · scale, so the arithmetic can be audited op by op.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigTypeError, ModelError
from hessq.graph import QuantAdd, QuantCat, QuantConv2d, QuantLinear, act_quantizers, node_location
from hessq.graph._pooling import average_pool_window
from hessq.quantizer._kernels import choose_kernel
from hessq.quantizer import ActQuantizer, dyadic, expand_scale


class IntegerConversionError(ModelError, RuntimeError):
    """The model has a part with no integer-only form."""


@dataclass
class Op:
    kind: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: torch.Tensor | None = None  # of the output; None for float values


@dataclass
class _Val:
    name: str
    dummy: torch.Tensor  # batch-1 stand-in with the value's shape
    scale: torch.Tensor | None  # None: float
    qmax: int = 0  # largest |code| (static bound), for integer values
    # Zero padding applied to a float value (the model input, e.g. TF "same" padding before the stem):
    # (pads, shape before) in order. Deferred until the value is quantized: with zero-point 0, quantizing
    # then padding with code 0 is exactly padding then quantizing, and keeps the pad integer.
    pending_pads: tuple = ()


def _channel(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    return scale if scale.dim() == 0 else scale.reshape([1, -1] + [1] * (ndim - 2))


class _Compiler:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.gm: fx.GraphModule = model.graph_module
        self.ops: list[Op] = []
        self.env: dict[fx.Node, Any] = {}

    def emit(self, node: fx.Node, kind: str, inputs: list[_Val], dummy: torch.Tensor, scale, qmax: int, attrs=None, tensors=None) -> _Val:
        op = Op(kind, [v.name for v in inputs], node.name, attrs or {}, tensors or {}, scale)
        self.ops.append(op)
        return _Val(node.name, dummy, scale, qmax)

    def fail(self, node: fx.Node, what: str) -> None:
        raise IntegerConversionError(
            f"{what} has no integer-only form ({node_location(node)}). hessq's integer model supports "
            "Conv2d, Linear, ReLU/ReLU6, max/average pooling, flatten/reshape, residual add and cat; "
            "ops such as sigmoid, softmax or layer norm have no integer form yet. Evaluate the "
            "QuantizedModel itself (fake quantization) for such models."
        )

    def run(self, input_shape: tuple[int, ...]) -> list[Op]:
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node, input_shape)
        return self.ops

    def arg(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.env[n])

    def visit(self, node: fx.Node, input_shape) -> Any:
        if node.op == "placeholder":
            if len([n for n in self.gm.graph.nodes if n.op == "placeholder"]) != 1:
                self.fail(node, "a model with several inputs")
            self.input_name = node.name
            return _Val(node.name, torch.zeros(1, *input_shape), None)
        if node.op == "output":
            v = self.arg(node.args[0])
            if not isinstance(v, _Val):
                self.fail(node, "an output that is not one tensor")
            if v.scale is None:
                self.fail(node, "an output computed without any quantized layer")
            self.emit(node, "dequantize", [v], v.dummy, None, 0, tensors={"scale": v.scale})
            self.output_name = node.name
            return None
        if node.op == "get_attr":
            self.fail(node, f"a parameter read directly (`{node.target}`)")
        args, kwargs = self.arg(node.args), self.arg(node.kwargs)
        if node.op == "call_module":
            return self.module(node, self.gm.get_submodule(node.target), args, kwargs)
        return self.function(node, node.target, args, kwargs, method=node.op == "call_method")

    # -- quantization ops ---------------------------------------------------------------------
    def module(self, node: fx.Node, m: nn.Module, args, kwargs) -> _Val:
        v = args[0]
        if isinstance(m, ActQuantizer):
            return self.requant(node, v, m)
        if isinstance(m, (QuantConv2d, QuantLinear)):
            return self.layer(node, m, v)
        if isinstance(m, (QuantAdd, QuantCat)):
            q = m.output_quantizer
            s_out = q.scale.double()
            tensors, bound = {}, 0
            for i, a in enumerate(args):
                if a.scale is None:
                    self.fail(node, "an add or cat with an unquantized float input")
                b, c = dyadic(a.scale / s_out)
                tensors[f"b{i}"], tensors[f"c{i}"] = b, c
            dummy = (args[0].dummy + args[1].dummy) if isinstance(m, QuantAdd) else torch.cat([a.dummy for a in args], m.dim)
            attrs = {"qmin": q.qmin, "qmax": q.qmax}
            if isinstance(m, QuantCat):
                attrs["dim"] = m.dim
            return self.emit(node, "add" if isinstance(m, QuantAdd) else "cat", list(args), dummy, s_out, max(-q.qmin, q.qmax), attrs, tensors)
        return self.function(node, m, args, kwargs)

    def requant(self, node: fx.Node, v: _Val, q: ActQuantizer) -> _Val:
        s_out = q.scale.double()
        bound = max(-q.qmin, q.qmax)
        attrs = {"qmin": q.qmin, "qmax": q.qmax}
        if v.scale is None and v.pending_pads:
            first = f"{node.name}_unpadded"
            self.ops.append(Op("quantize", [v.name], first, attrs, {"scale": s_out}, s_out))
            current, dummy = first, v.pending_pads[0][1]
            for i, (pads, _) in enumerate(v.pending_pads):
                out = node.name if i == len(v.pending_pads) - 1 else f"{node.name}_pad{i}"
                dummy = F.pad(dummy, pads)
                self.ops.append(Op("pad", [current], out, {"pads": pads}, {}, s_out))
                current = out
            return _Val(node.name, dummy, s_out, bound)
        if v.scale is None:
            return self.emit(node, "quantize", [v], v.dummy, s_out, bound, attrs, {"scale": s_out})
        b, c = dyadic(v.scale / s_out)
        return self.emit(node, "requantize", [v], v.dummy, s_out, bound, attrs, {"b": b, "c": c})

    def layer(self, node: fx.Node, m: QuantConv2d | QuantLinear, v: _Val) -> _Val:
        q_in = m.act_quantizer
        if v.scale is None or q_in is None or v.scale.dim() or float(v.scale) != float(q_in.scale.double()):
            raise IntegerConversionError(f"internal: input of `{node.target}` is not on its quantizer's grid")
        w, s_w = m.integer_weight()
        out_channels = w.shape[0]
        acc_scale = expand_scale(s_w, torch.empty(out_channels), 0) * v.scale
        bias = m.integer_bias(v.scale)
        bound = int(w.abs().flatten(1).sum(1).max()) * v.qmax + (int(bias.abs().max()) if bias is not None else 0)
        tensors = {"weight": w.to(torch.int8)}
        if bias is not None:
            tensors["bias"] = bias.to(torch.int32)
        attrs = {"w_bits": m.w_bits, "kernel": choose_kernel(bound), "bound": bound}
        if isinstance(m, QuantConv2d):
            attrs.update(stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation), groups=m.groups)
            dummy = F.conv2d(v.dummy.double(), w.double(), None, m.stride, m.padding, m.dilation, m.groups)
            kind = "conv2d"
        else:
            dummy = F.linear(v.dummy.double(), w.double())
            kind = "linear"
        return self.emit(node, kind, [v], dummy.to(torch.int64), _channel(acc_scale, dummy.dim()), bound, attrs, tensors)

    # -- ops that carry codes through -----------------------------------------------------------
    def function(self, node: fx.Node, op, args, kwargs, method: bool = False) -> Any:
        v = args[0] if args else None
        name = op if method else (getattr(op, "__name__", None) or type(op).__name__)
        if not isinstance(v, _Val):  # shape arithmetic on Python values
            return getattr(v, op)(*args[1:], **kwargs) if method else op(*args, **kwargs)
        rest = args[1:]
        if op is getattr or name in ("size", "dim"):
            return getattr(v.dummy, rest[0]) if op is getattr else getattr(v.dummy, name)(*rest, **kwargs)
        if isinstance(op, (nn.Dropout, nn.Identity)) or name in ("dropout", "contiguous"):
            return v
        if isinstance(op, nn.ZeroPad2d) and v.scale is None:
            pads = list(op.padding)
            return _Val(v.name, F.pad(v.dummy, pads), None, 0, v.pending_pads + ((pads, v.dummy),))
        if v.pending_pads:
            self.fail(node, "an op on a zero-padded float input (other than quantizing it)")
        if isinstance(op, nn.ZeroPad2d):
            pads = list(op.padding)
            dummy = F.pad(v.dummy, pads)
            scale = v.scale if v.scale.dim() == 0 else v.scale.expand(v.dummy.shape)[:, :, :1, :1]
            return self.emit(node, "pad", [v], dummy, scale, v.qmax, {"pads": pads})
        if isinstance(op, nn.ReLU) or name == "relu":
            return self.emit(node, "relu", [v], v.dummy, v.scale, v.qmax) if v.scale is not None else self.fail(node, "ReLU on a float input")
        if isinstance(op, nn.ReLU6) or name == "relu6":
            if v.scale is None:
                self.fail(node, "ReLU6 on a float input")
            full = v.scale.expand(v.dummy.shape)[:1] if v.scale.dim() else v.scale
            six = torch.floor(6.0 / full + 0.5).to(torch.int64)
            return self.emit(node, "clamp", [v], v.dummy, v.scale, v.qmax, tensors={"max": six})
        if isinstance(op, nn.MaxPool2d) or name == "max_pool2d":
            if isinstance(op, nn.MaxPool2d):
                p = dict(kernel_size=op.kernel_size, stride=op.stride, padding=op.padding, dilation=op.dilation, ceil_mode=op.ceil_mode)
            else:
                names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
                p = dict(zip(names, rest)) | dict(kwargs)
                p.pop("return_indices", None)
            p = {k: (list(x) if isinstance(x, tuple) else x) for k, x in p.items()}
            return self.emit(node, "max_pool2d", [v], F.max_pool2d(v.dummy.double(), **p).to(v.dummy.dtype), v.scale, v.qmax, p)
        if isinstance(op, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) or name in ("adaptive_avg_pool2d", "avg_pool2d"):
            return self.sum_pool(node, op, v, rest, kwargs)
        if name == "mean":
            dims = rest[0] if rest else kwargs.get("dim")
            dims = list(dims) if isinstance(dims, (tuple, list)) else [dims]
            keepdim = bool(rest[1] if len(rest) > 1 else kwargs.get("keepdim", False))
            count = 1
            for d in dims:
                count *= v.dummy.shape[d]
            scale = self.reduced_scale(node, v, dims, keepdim)
            dummy = v.dummy.sum(dims, keepdim=keepdim)
            return self.emit(node, "sum", [v], dummy, scale / count, v.qmax * count, {"dims": dims, "keepdim": keepdim})
        if isinstance(op, nn.Flatten) or name == "flatten":
            if isinstance(op, nn.Flatten):
                start, end = op.start_dim, op.end_dim
            else:
                start = rest[0] if rest else kwargs.get("start_dim", 0)
                end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
            if start == 0:
                self.fail(node, "flatten over the batch dimension")
            dummy = torch.flatten(v.dummy, start, end)
            return self.emit(node, "flatten", [v], dummy, self.reshaped_scale(v, lambda t: torch.flatten(t, start, end)), v.qmax, {"start_dim": start, "end_dim": end})
        if name in ("view", "reshape"):
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            shape = list(shape)
            if not shape or not all(isinstance(s, int) for s in shape):
                self.fail(node, f"{name} with a shape that is not constant")
            target = [-1 if i == 0 else s for i, s in enumerate(shape)]  # the batch dimension stays free
            dummy = v.dummy.reshape(target)
            return self.emit(node, "reshape", [v], dummy, self.reshaped_scale(v, lambda t: t.reshape(target)), v.qmax, {"shape": target})
        if op is operator.getitem:
            self.fail(node, "indexing a tensor")
        self.fail(node, f"`{name}`")

    def reshaped_scale(self, v: _Val, fn) -> torch.Tensor | None:
        if v.scale is None or v.scale.dim() == 0:
            return v.scale
        return fn(v.scale.expand(v.dummy.shape).contiguous())

    def reduced_scale(self, node, v: _Val, dims, keepdim) -> torch.Tensor:
        if v.scale.dim() == 0:
            return v.scale
        full = v.scale.expand(v.dummy.shape)
        hi, lo = full.amax(dims, keepdim=keepdim), full.amin(dims, keepdim=keepdim)
        if not torch.equal(hi, lo):
            self.fail(node, "a mean across channels with different scales")
        return hi

    def sum_pool(self, node, op, v: _Val, rest, kwargs) -> _Val:
        if v.scale is None:
            self.fail(node, "average pooling of a float input")
        try:
            kernel, stride = average_pool_window(op, rest, kwargs, *v.dummy.shape[-2:])
        except ValueError as exc:
            self.fail(node, str(exc))
        count = kernel[0] * kernel[1]
        dummy = F.avg_pool2d(v.dummy.double(), kernel, stride).to(torch.int64)
        return self.emit(node, "sum_pool2d", [v], dummy, v.scale / count, v.qmax * count, {"kernel": kernel, "stride": stride})


def compile_program(model: nn.Module) -> tuple[list[Op], str, str, tuple[int, ...]]:
    """(ops, input name, output name, per-sample input shape) of a calibrated QuantizedModel."""
    if not hasattr(model, "graph_module"):
        raise ConfigTypeError(f"to_integer needs a model from hessq.quantize, got {type(model).__name__}")
    uncalibrated = [n for n, q in act_quantizers(model).items() if not bool(q.calibrated)]
    if uncalibrated or not hasattr(model, "input_shape"):
        raise IntegerConversionError(
            f"the model was never calibrated (uncalibrated quantizers: {uncalibrated[:3]}); "
            "quantize it with hessq.quantize(model, plan, calibration_batches) first"
        )
    if model.float_ops:
        raise IntegerConversionError(f"the model keeps float ops with no integer form: {model.float_ops[:3]}")
    floats = [n for n, b in model.layer_bits.items() if b is None]
    if floats:
        raise IntegerConversionError(f"layers {floats[:3]} were left in floating point by the plan; an integer model needs every layer quantized")
    compiler = _Compiler(model)
    with torch.no_grad():
        ops = compiler.run(tuple(model.input_shape))
    return ops, compiler.input_name, compiler.output_name, tuple(model.input_shape)
