"""Naming the op that has no double backward, the module it sits in, and the layers it blocks."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from hessq._errors import ModelError


def _walk(roots) -> list:
    """Every autograd node reachable from ``roots`` (grad_fn objects), each once."""
    seen, order, stack = set(), [], [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return order


def _norm(op: str) -> str:
    op = op.lower().split("::")[-1]
    op = re.sub(r"backward\d*|forward", "", op)
    return op.replace("_", "")


def _once_differentiable(node) -> bool:
    cls = getattr(node, "_forward_cls", None)
    backward = getattr(cls, "backward", None)
    code = getattr(backward, "__code__", None)
    return code is not None and code.co_filename.replace("\\", "/").endswith("autograd/function.py") and hasattr(backward, "__wrapped__")


def _node_modules(model: nn.Module, batch, loss_fn, device) -> tuple[torch.Tensor, dict]:
    """Run one forward and map each autograd node to the innermost module that created it."""
    from hessq._utils import move_to
    from hessq.sensitivity._hvp import run_model

    owner: dict = {}
    boundary: dict[str, list] = {}

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, (list, tuple)):
            return [t for o in obj for t in tensors(o)]
        if isinstance(obj, dict):
            return [t for o in obj.values() for t in tensors(o)]
        return []

    def pre(name):
        def hook(module, args):
            boundary[name] = [t.grad_fn for t in tensors(args) if t.grad_fn is not None]
        return hook

    def post(name):
        def hook(module, args, output):
            stop = set(boundary.get(name, []))
            stack = [t.grad_fn for t in tensors(output) if t.grad_fn is not None]
            while stack:
                node = stack.pop()
                if node in stop or node in owner:
                    continue
                owner[node] = name
                stack.extend(n for n, _ in node.next_functions if n is not None)
        return hook

    handles = []
    for name, m in model.named_modules():
        handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    try:
        with torch.enable_grad():
            loss = loss_fn(run_model(model, move_to(batch[0], device)), move_to(batch[1], device))
    finally:
        for h in handles:
            h.remove()
    return loss, owner


def _blocked_layers(nodes, params: Sequence[torch.Tensor], names: Sequence[str]) -> list[str]:
    """Layers whose weight is reached by back-propagating from ``nodes`` (their Hessian needs those nodes)."""
    ids = {id(p): n for p, n in zip(params, names)}
    hit = set()
    for node in _walk(nodes):
        var = getattr(node, "variable", None)
        if var is not None and id(var) in ids:
            hit.add(ids[id(var)])
    return [n for n in names if n in hit]


def _message(op: str, modules: list[str], blocked: list[str], names: Sequence[str], cause: str) -> ModelError:
    where = f" in module {', '.join(repr(m or '<model>') for m in modules)}" if modules else ""
    keep = [n for n in names if n not in blocked]
    fix = (
        f"Exclude the layers behind it with layers={keep}" if keep
        else "No analysed layer can be reached without it; replace it by an op with a double backward"
    )
    return ModelError(
        f"{op}{where} has no double backward ({cause}), so the Hessian of the layers {blocked or list(names)} "
        f"cannot be computed by double back-propagation. {fix}, or rewrite that op with differentiable "
        "PyTorch operations (a custom autograd.Function needs a backward that is itself differentiable, "
        "without @once_differentiable)."
    )


def check_double_backward(model, loss, params, names, batch, loss_fn, device) -> None:
    """Raise before any product if the graph holds a @once_differentiable custom function.

    Such a function silently returns a zero second derivative, so it is caught up front.
    """
    bad = [n for n in _walk([loss.grad_fn]) if _once_differentiable(n)]
    blocked = _blocked_layers(bad, params, names)
    if not bad or not blocked:
        return
    ops = sorted({n._forward_cls.__name__ for n in bad})
    again, owner = _node_modules(model, batch, loss_fn, device)  # same graph, recorded with module hooks
    modules = sorted({owner[n] for n in _walk([again.grad_fn]) if _once_differentiable(n) and n in owner})
    raise _message(f"the custom autograd.Function {', '.join(ops)}", modules, blocked, names, "its backward is @once_differentiable")


def double_backward_error(exc: RuntimeError, model, params, names, batch, loss_fn, device) -> Exception:
    """Turn autograd's 'derivative for X is not implemented' into an error naming X, its module and the fix."""
    text = str(exc)
    m = re.search(r"derivative for (?:'|\")?([\w:.]+)", text)
    if not m:
        return exc
    op = m.group(1)
    loss, owner = _node_modules(model, batch, loss_fn, device)
    target = _norm(op)
    nodes = [n for n in _walk([loss.grad_fn]) if _norm(n.name()) == target]
    modules = sorted({owner[n] for n in nodes if n in owner})
    blocked = _blocked_layers(nodes, params, names) if nodes else list(names)
    return _message(f"the op {op!r}", modules, blocked, names, f"autograd: {text.strip()}")
