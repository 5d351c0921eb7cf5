"""Index values: token ids, the attention mask computed from them, constant position / token-type ids,
RoBERTa's position ids numbered from the padding (:func:`padding_positions`), and MPNet's relative-position buckets
(:func:`relative_position_buckets`, a constant of the sequence length).

These are exact integers, never quantized: ``input_ids != pad`` is a comparison of integers, ``unsqueeze`` moves
them, ``torch.arange(T)`` and ``torch.zeros_like`` of it are constants of the sequence length (computed while
compiling, like any op on sizes alone). In the integer program an index value is a :class:`Value` with no scale
whose stand-in is an integer or bool tensor; a masked softmax reads the mask and an embedding lookup the ids.
``unsqueeze`` also moves quantized codes, keeping their grid.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

from hessq.ops._program import Value
from hessq.ops._registry import QuantOp, is_shape_arithmetic, register
from hessq.ops.shape import _full_scale

#: Program op kinds that read token ids as they are: a model whose input only these read takes int64 ids.
ID_READERS = ("embedding", "compare", "padding_positions")

_COMPARISONS = {operator.ne: "ne", torch.ne: "ne", "ne": "ne", operator.eq: "eq", torch.eq: "eq", "eq": "eq"}


def is_index(v: Value) -> bool:
    """Whether ``v`` holds exact integers that are not quantized codes (ids, a mask), not a float value."""
    return v.scale is None and not v.dummy.is_floating_point()


@register
class Compare(QuantOp):
    """``ids != k`` and ``ids == k`` on integer ids (the padding mask), and the constant ids of a sequence."""

    name = "compare"
    functions = (operator.ne, operator.eq, torch.ne, torch.eq, torch.arange, torch.zeros_like, torch.ones_like)
    methods = ("ne", "eq")
    kinds = ("compare",)

    def matches(self, node, modules):
        return super().matches(node, modules) and not is_shape_arithmetic(node)

    def compile(self, program, node, op, args, kwargs):
        kind = _COMPARISONS.get(op)
        if kind is None:  # arange or zeros_like of a tensor the model computed: no integer form
            program.fail(node, f"a {getattr(op, '__name__', op)} of a computed tensor")
        v, k = (args[0], args[1]) if isinstance(args[0], Value) else (args[1], args[0])
        if isinstance(k, torch.Tensor) and k.numel() == 1:
            k = k.item()
        if not isinstance(v, Value) or not isinstance(k, numbers.Integral) or isinstance(k, bool):
            program.fail(node, "a comparison other than of token ids with an integer")
        if v.scale is not None:
            program.fail(node, "a comparison of quantized activations")
        # the model input arrives here as a float stand-in: ids are compared as the integers they are
        dummy = v.dummy.long() != k if kind == "ne" else v.dummy.long() == k
        return program.emit(node.name, "compare", [v], dummy, None, 1, {"op": kind, "value": int(k)})

    def execute(self, op, inputs, kernel):
        ids = inputs[0].long()
        return ids != op.attrs["value"] if op.attrs["op"] == "ne" else ids == op.attrs["value"]

    def onnx(self, ex, op, ins):
        ids = ex.node("Cast", [ins[0].name], "ids", to=ex.TP.INT64)
        equal = ex.node("Equal", [ids, ex.const("value", np.array(op.attrs["value"], np.int64))], "equal")
        return ex.tensor(ex.node("Not", [equal], "not_equal") if op.attrs["op"] == "ne" else equal, "mask")


@register
class Unsqueeze(QuantOp):
    """``x.unsqueeze(d)`` (after the batch dimension) of codes, keeping their grid, or of a mask."""

    name = "unsqueeze"
    functions = (torch.unsqueeze,)
    methods = ("unsqueeze",)
    kinds = ("unsqueeze",)
    keeps_grid = True

    def compile(self, program, node, op, args, kwargs):
        v = args[0]
        dim = args[1] if len(args) > 1 else kwargs["dim"]
        dim = dim + v.dummy.dim() + 1 if dim < 0 else dim
        if dim == 0:
            program.fail(node, "an unsqueeze before the batch dimension")
        return program.emit(node.name, "unsqueeze", [v], v.dummy.unsqueeze(dim), _full_scale(v, lambda t: t.unsqueeze(dim)),
                            v.qmax, {"dim": dim})

    def execute(self, op, inputs, kernel):
        return inputs[0].unsqueeze(op.attrs["dim"])

    def onnx(self, ex, op, ins):
        t = ins[0]
        out = ex.node("Unsqueeze", [t.name, ex.const("axes", np.array([op.attrs["dim"]], np.int64))], "unsqueeze")
        return ex.tensor(out, t.kind, t.scale, t.zero_point)


def padding_positions(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """RoBERTa's position ids: the tokens that are not ``pad`` numbered pad + 1, pad + 2, … along each row, the
    padding at ``pad`` (left padding too: a row's first real token is always pad + 1)."""
    keep = (ids != pad).long()
    return torch.cumsum(keep, dim=1) * keep + pad


@register
class PaddingPositions(QuantOp):
    """:func:`padding_positions` of token ids: exact integers, as the ids they come from."""

    name = "padding_positions"
    functions = (padding_positions,)
    kinds = ("padding_positions",)

    def compile(self, program, node, op, args, kwargs):
        v, pad = args[0], args[1] if len(args) > 1 else kwargs["pad"]
        if not isinstance(v, Value) or v.scale is not None or not isinstance(pad, numbers.Integral):
            program.fail(node, "position ids from anything but token ids and an integer pad id")
        return program.emit(node.name, "padding_positions", [v], padding_positions(v.dummy.long(), int(pad)), None, 1,
                            {"pad": int(pad)})

    def execute(self, op, inputs, kernel):
        return padding_positions(inputs[0].long(), op.attrs["pad"])

    def onnx(self, ex, op, ins):
        ids = ex.node("Cast", [ins[0].name], "ids", to=ex.TP.INT64)
        pad = ex.const("pad", np.array(op.attrs["pad"], np.int64))
        keep = ex.node("Cast", [ex.node("Not", [ex.node("Equal", [ids, pad], "equal")], "not_pad")], "keep",
                       to=ex.TP.INT64)
        count = ex.node("CumSum", [keep, ex.const("axis", np.array(1, np.int64))], "count")
        return ex.tensor(ex.node("Add", [ex.node("Mul", [count, keep], "numbered"), pad], "positions"), "mask")


def relative_position_buckets(length: int, num_buckets: int = 32, max_distance: int = 128,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """MPNet's (T5's bidirectional) relative-position buckets of a sequence of ``length`` tokens, [1, T, T] int64:
    bucket[i, j] of the key j's offset j − i from the query i. Half the buckets for keys before the query, half for
    after; offsets below a quarter of the buckets each get their own, longer ones share log-spaced buckets up to
    ``max_distance``. Computed in float32 as transformers computes it, so the buckets are the same.

    It reads the length alone (``ids.size(1)``): in the integer program it is a constant of the sequence length, and
    a lookup of it (the relative attention bias) a constant too."""
    position = torch.arange(length, device=device)
    n = position[:, None] - position[None, :]  # query − key: minus the key's offset
    half = num_buckets // 2
    bucket = (n < 0).to(torch.long) * half
    n = torch.abs(n)
    exact = half // 2
    # log-spaced beyond the exact range (the clamp only keeps log(0) out of the branch torch.where discards)
    far = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)).to(torch.long)
    far = torch.minimum(far, torch.full_like(far, half - 1))
    return (bucket + torch.where(n < exact, n, far)).unsqueeze(0)


@register
class RelativePositionBuckets(QuantOp):
    """:func:`relative_position_buckets` of the sequence length: computed while compiling, never a program op."""

    name = "relative_position_buckets"
    functions = (relative_position_buckets,)

    def compile(self, program, node, op, args, kwargs):
        program.fail(node, "relative position buckets of a length computed from tensor values")
