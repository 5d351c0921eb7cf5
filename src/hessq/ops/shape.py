"""Ops that move codes without arithmetic: flatten, reshape, zero padding, identity, and size queries."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessq.ops._program import Value
from hessq.ops._registry import QuantOp, is_shape_arithmetic, register


def _full_scale(v: Value, fn) -> torch.Tensor | None:
    """The scale after a shape op ``fn``: a per-channel scale is expanded to the value's shape and moved along."""
    if v.scale is None or v.scale.dim() == 0:
        return v.scale
    return fn(v.scale.expand(v.dummy.shape).contiguous())


@register
class Flatten(QuantOp):
    name = "flatten"
    modules = (nn.Flatten,)
    functions = (torch.flatten,)
    methods = ("flatten",)
    canonical = torch.flatten
    kinds = ("flatten",)
    keeps_grid = True

    def canonical_call(self, node, module):
        if module is not None:
            return (node.args[0], module.start_dim, module.end_dim), {}
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return (node.args[0], start, end), {}

    def compile(self, program, node, op, args, kwargs):
        v, start, end = args
        if start == 0:
            program.fail(node, "flatten over the batch dimension")
        dummy = torch.flatten(v.dummy, start, end)
        scale = _full_scale(v, lambda t: torch.flatten(t, start, end))
        return program.emit(node.name, "flatten", [v], dummy, scale, v.qmax, {"start_dim": start, "end_dim": end})

    def execute(self, op, inputs, kernel):
        return torch.flatten(inputs[0], op.attrs["start_dim"], op.attrs["end_dim"])

    def onnx(self, ex, op, ins):
        t = ins[0]
        return ex.tensor(ex.node("Flatten", [t.name], "flatten", axis=op.attrs["start_dim"]), t.kind, t.scale, t.zero_point)


@register
class Reshape(QuantOp):
    name = "reshape"
    functions = (torch.reshape,)
    methods = ("view", "reshape")
    canonical = torch.reshape
    kinds = ("reshape",)
    keeps_grid = True

    def canonical_call(self, node, module):
        rest = node.args[1:]
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if not rest:
            shape = node.kwargs.get("shape", node.kwargs.get("size", ()))
        return (node.args[0], tuple(shape)), {}

    def compile(self, program, node, op, args, kwargs):
        v, shape = args
        if not shape or not all(isinstance(s, int) for s in shape):
            program.fail(node, "reshape to a shape that is not constant")
        dummy = v.dummy.reshape([1, *shape[1:]])  # the batch dimension stays free; a -1 elsewhere is resolved
        target = [-1, *dummy.shape[1:]]
        return program.emit(node.name, "reshape", [v], dummy, _full_scale(v, lambda t: t.reshape(target)), v.qmax, {"shape": target})

    def execute(self, op, inputs, kernel):
        return inputs[0].reshape(op.attrs["shape"])

    def onnx(self, ex, op, ins):
        t = ins[0]
        out = ex.node("Reshape", [t.name, ex.const("shape", np.array(op.attrs["shape"], np.int64))], "reshape")
        return ex.tensor(out, t.kind, t.scale, t.zero_point)


@register
class ZeroPad(QuantOp):
    """Zero padding: code 0 is the real value 0 on every zero-point-0 grid."""

    name = "pad"
    modules = (nn.ZeroPad2d,)
    functions = (F.pad,)
    canonical = F.pad
    kinds = ("pad",)
    keeps_grid = True

    def canonical_call(self, node, module):
        if module is not None:
            return (node.args[0], list(module.padding)), {}
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0):
            return None
        pads = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        return (node.args[0], list(pads)), {}

    def matches(self, node, modules):
        if node.op == "call_function" and node.target is F.pad:
            return self.canonical_call(node, None) is not None
        return super().matches(node, modules)

    def compile(self, program, node, op, args, kwargs):
        v, pads = args[0], list(args[1])
        if v.scale is None:  # padding the float input: deferred until it is quantized
            return Value(v.name, F.pad(v.dummy, pads), None, 0, v.pending_pads + ((pads, v.dummy),))
        if v.pending_pads:
            program.fail(node, "an op on a zero-padded float input (other than quantizing it)")
        dummy = F.pad(v.dummy, pads)
        scale = v.scale if v.scale.dim() == 0 else v.scale.expand(v.dummy.shape)[:, :, :1, :1]
        return program.emit(node.name, "pad", [v], dummy, scale, v.qmax, {"pads": pads})

    def execute(self, op, inputs, kernel):
        return F.pad(inputs[0], op.attrs["pads"])

    def onnx(self, ex, op, ins):
        left, right, top, bottom = op.attrs["pads"]
        pads = ex.const("pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
        t = ins[0]
        fill = np.uint8(t.zero_point) if t.kind == "codes" else (np.float64(0) if t.kind == "acc" else np.float32(0))
        out = ex.tensor(ex.node("Pad", [t.name, pads, ex.const("fill", fill)], "pad"), t.kind, t.scale, t.zero_point)
        if not ex.exact and t.kind == "codes" and t.padded_from is None and min(left, right, top, bottom) >= 0:
            out.padded_from, out.pads = t, (top, left, bottom, right)
        return out


@register
class Identity(QuantOp):
    """Identity in eval mode: dropout, nn.Identity, contiguous."""

    name = "identity"
    modules = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
    functions = (F.dropout, F.dropout2d)
    methods = ("contiguous",)
    keeps_grid = True

    def matches(self, node, modules):
        # torchvision.ops.stochastic_depth (an fx-wrapped function; its StochasticDepth module calls it), matched
        # by name so that torchvision stays optional
        target = node.target
        if node.op == "call_function" and getattr(target, "__name__", "") == "stochastic_depth" \
                and getattr(target, "__module__", "").startswith("torchvision."):
            return True
        return super().matches(node, modules)

    def compile(self, program, node, op, args, kwargs):
        v = args[0]
        if v.pending_pads:
            program.fail(node, "an op on a zero-padded float input (other than quantizing it)")
        return v


def _index(program, node, v: Value, index) -> Value:
    """``x[:, 0]``, ``x[:, 1:3]``: basic indexing after the batch dimension, as slices and a reshape."""
    index = index if isinstance(index, tuple) else (index,)
    if not index or index[0] != slice(None) or not all(
            isinstance(i, int) or (isinstance(i, slice) and i.step in (None, 1)) for i in index):
        program.fail(node, "indexing a tensor other than by integers and unit-step slices after the batch dimension")
    current, dropped = v, []
    for dim, i in enumerate(index[1:], start=1):
        size = current.dummy.shape[dim]
        if isinstance(i, int):
            start = i % size
            stop = start + 1
            dropped.append(dim)
        else:
            start, stop, _ = i.indices(size)
        if (start, stop) == (0, size):
            continue
        scale = _full_scale(current, lambda t, d=dim, a=start, b=stop: t.narrow(d, a, b - a))
        current = program.emit(f"{node.name}_slice{dim}", "slice", [current], current.dummy.narrow(dim, start, stop - start),
                               scale, v.qmax, {"dim": dim, "start": start, "end": stop})
    if not dropped:
        return current
    shape = [s for d, s in enumerate(current.dummy.shape) if d not in dropped]
    scale = current.scale if current.scale.dim() == 0 else current.scale.expand(current.dummy.shape).reshape(shape)
    return program.emit(node.name, "reshape", [current], current.dummy.reshape(shape), scale, v.qmax, {"shape": [-1, *shape[1:]]})


@register
class Shape(QuantOp):
    """Size queries (``x.size(0)``, ``x.shape``, ``x.dim()``): Python values, computed from the value's shape."""

    name = "shape"
    functions = (getattr, operator.getitem)
    methods = ("size", "dim")
    keeps_grid = True  # x[i] of a tensor keeps its codes' grid

    def compile(self, program, node, op, args, kwargs):
        v = args[0]
        if op is operator.getitem and isinstance(v, (tuple, list)):
            return v[args[1]]  # one of the parts of a chunk or split
        if op is operator.getitem:
            return _index(program, node, v, args[1])
        if op is getattr:
            return getattr(v.dummy, args[1])
        return getattr(v.dummy, op)(*args[1:], **kwargs)


@register
class SizeArithmetic(QuantOp):
    """Arithmetic on sizes (``x.size(1) * x.size(2)``, ``h // p``, ``h == 224``) and ``torch._assert`` on them:
    Python values computed while compiling, never tensor ops."""

    name = "size_arithmetic"
    functions = (operator.mul, operator.floordiv, operator.add, operator.sub, operator.eq, operator.ne,
                 operator.mod, torch._assert)
    keeps_grid = False

    def matches(self, node, modules):
        return super().matches(node, modules) and is_shape_arithmetic(node)

    def compile(self, program, node, op, args, kwargs):
        program.fail(node, "arithmetic mixing sizes and tensors")  # pure size arithmetic never reaches a family
