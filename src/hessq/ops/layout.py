"""Layout ops on the integer grid: permute / transpose (a reordering of the codes), chunk / split (slices).

The codes move, the grid stays; a per-channel scale is expanded to the value's shape and moved along. The batch
dimension stays first.
"""

from __future__ import annotations

import numpy as np
import torch

from hessq.ops._registry import QuantOp, register
from hessq.ops.shape import _full_scale


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


@register
class Permute(QuantOp):
    name = "permute"
    functions = (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims)
    methods = ("permute", "transpose", "swapaxes", "swapdims")
    canonical = torch.permute
    kinds = ("permute",)
    keeps_grid = True

    def canonical_call(self, node, module):
        if node.target not in (torch.permute, "permute"):
            return None  # a transpose keeps its form: its permutation depends on the rank
        rest = list(node.args[1:])
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return (node.args[0], tuple(dims or node.kwargs.get("dims", ()))), {}

    def compile(self, program, node, op, args, kwargs):
        v, ndim = args[0], args[0].dummy.dim()
        if op in (torch.permute, "permute"):
            perm = [_dim(d, ndim) for d in args[1]]
        else:
            perm = list(range(ndim))
            a, b = (_dim(d, ndim) for d in (list(args[1:]) + [kwargs.get(k) for k in ("dim0", "dim1") if k in kwargs])[:2])
            perm[a], perm[b] = perm[b], perm[a]
        if perm[0] != 0:
            program.fail(node, "a permutation that moves the batch dimension")
        return program.emit(node.name, "permute", [v], v.dummy.permute(perm), _full_scale(v, lambda t: t.permute(perm)),
                            v.qmax, {"perm": perm})

    def execute(self, op, inputs, kernel):
        return inputs[0].permute(op.attrs["perm"])

    def onnx(self, ex, op, ins):
        t = ins[0]
        return ex.tensor(ex.node("Transpose", [t.name], "transpose", perm=op.attrs["perm"]), t.kind, t.scale, t.zero_point)


@register
class Split(QuantOp):
    """chunk and split: parts along one dimension, each a slice of the codes."""

    name = "split"
    functions = (torch.chunk, torch.split, torch.tensor_split)
    methods = ("chunk", "split")
    kinds = ("slice",)
    keeps_grid = True

    def compile(self, program, node, op, args, kwargs):
        v, spec = args[0], (args[1] if len(args) > 1 else kwargs.get("chunks", kwargs.get("split_size_or_sections",
                                                                                            kwargs.get("split_size"))))
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        dim = _dim(dim, v.dummy.dim())
        if dim == 0:
            program.fail(node, "a split of the batch dimension")
        chunk = (op is torch.chunk) or op == "chunk"
        parts = v.dummy.chunk(spec, dim) if chunk else v.dummy.split(spec, dim)
        out, start = [], 0
        for i, part in enumerate(parts):
            end = start + part.shape[dim]
            scale = _full_scale(v, lambda t, s=start, e=end: t.narrow(dim, s, e - s))
            out.append(program.emit(f"{node.name}_{i}", "slice", [v], part, scale, v.qmax,
                                    {"dim": dim, "start": start, "end": end}))
            start = end
        return tuple(out)

    def execute(self, op, inputs, kernel):
        a = op.attrs
        return inputs[0].narrow(a["dim"], a["start"], a["end"] - a["start"])

    def onnx(self, ex, op, ins):
        t, a = ins[0], op.attrs
        consts = [ex.const(n, np.array([v], np.int64)) for n, v in (("start", a["start"]), ("end", a["end"]), ("axis", a["dim"]))]
        return ex.tensor(ex.node("Slice", [t.name, *consts], "slice"), t.kind, t.scale, t.zero_point)
