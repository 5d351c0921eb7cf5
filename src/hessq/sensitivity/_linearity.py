"""Which layers the network output is linear in: read off the autograd graph of one forward.

If every op between a layer's weight W and the model output is piecewise linear (ReLU, ReLU6,
max-pool, BN in eval mode, residual adds, pooling, reshapes) and every product (conv, matmul,
elementwise multiply) has W on one side only, the output is linear in W wherever it is
differentiable, so ∂²f/∂W² = 0 and the loss Hessian's block of W equals its Gauss-Newton
block. Anything not on the lists below (SiLU, GELU, tanh, sigmoid, softmax, LayerNorm, BN in
training mode, a custom autograd function) counts as non-linear for every weight below it: the
test errs towards the slower, general estimator, never towards a wrong one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

#: Ops linear in each input (sums, views, pooling, padding, dtype casts).
LINEAR = frozenset({
    "add", "sub", "neg", "view", "reshapealias", "unsafeview", "t", "transpose", "permute", "expand", "squeeze",
    "unsqueeze", "clone", "cat", "stack", "slice", "select", "index", "indexselect", "gather", "split",
    "splitwithsizes", "unbind", "sum", "mean", "avgpool2d", "avgpool1d", "adaptiveavgpool2d", "constantpadnd",
    "tocopy", "asstrided", "alias", "repeat", "upsamplenearest2d", "upsamplebilinear2d", "roll", "flip",
    "unfold", "im2col", "col2im", "pixelshuffle", "pixelunshuffle", "diagonal", "tril", "triu", "narrow",
})
#: Ops piecewise linear in their input (a.e. locally linear: the second derivative is zero).
PIECEWISE = frozenset({
    "relu", "hardtanh", "leakyrelu", "threshold", "clamp", "clampmin", "clampmax", "abs", "maxpool2dwithindices",
    "maxpool1dwithindices", "adaptivemaxpool2d", "maximum", "minimum", "max", "min", "sort", "topk",
    "reflectionpad2d", "replicationpad2d",
})
#: Products: linear in each operand, non-linear in a weight that reaches two operands.
BILINEAR = frozenset({"mul", "mm", "addmm", "bmm", "baddbmm", "convolution", "addmv", "mv", "dot", "prelu"})
#: Batch norm: affine in its input only with running statistics (eval mode).
BATCH_NORM = frozenset({"nativebatchnorm", "cudnnbatchnorm", "miopenbatchnorm"})


def _op(node) -> str:
    return re.sub(r"backward\d*$", "", type(node).__name__.lower())


def linear_in(output: torch.Tensor, params: Sequence[torch.Tensor]) -> list[bool]:
    """For each of ``params``: is ``output`` linear in it (its Hessian block equals the Gauss-Newton one)?

    Walks the autograd graph of ``output`` once, tracking which parameters each node depends on
    (as a bit set), and marks a parameter non-linear when it enters a non-linear op, both operands
    of a product, or the divisor of a division.
    """
    index = {id(p): i for i, p in enumerate(params)}
    deps: dict = {}
    bad = 0
    stack = [(output.grad_fn, False)]
    while stack:  # iterative post-order DFS: a deep net's graph would overflow Python's recursion
        node, ready = stack.pop()
        if node is None or node in deps:
            continue
        children = [n for n, _ in node.next_functions]
        if not ready:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c is not None and c not in deps)
            continue
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad: a leaf
            deps[node] = 1 << index[id(var)] if id(var) in index else 0
            continue
        sets = [deps.get(c, 0) if c is not None else 0 for c in children]
        mine = 0
        for s in sets:
            mine |= s
        deps[node] = mine
        op = _op(node)
        if op in LINEAR or op in PIECEWISE:
            continue
        if op == "div" and len(sets) == 2:
            bad |= sets[1]  # x / d is linear in x, not in d
            continue
        if op in BILINEAR or (op in BATCH_NORM and not getattr(node, "_saved_training", True)):
            for i in range(len(sets)):
                for j in range(i + 1, len(sets)):
                    bad |= sets[i] & sets[j]
            continue
        bad |= mine  # any other op: non-linear for everything below it
    return [not (bad >> i) & 1 for i in range(len(params))]
