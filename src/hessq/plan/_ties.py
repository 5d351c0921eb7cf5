"""Which layers must share bits: convs whose outputs meet at the same residual add (torch.fx)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import fx, nn

from hessq._errors import ConfigError
from hessq.graph import quantizable_layers, traced
from hessq.ops import family_of, family_of_module, is_shape_arithmetic


@dataclass
class GraphFacts:
    """What a torch.fx trace tells the planner: residual ties and layers followed by BatchNorm."""

    ties: list[list[str]] = field(default_factory=list)
    bn_followed: set[str] = field(default_factory=set)
    traced: bool = False


def graph_facts(model: nn.Module) -> GraphFacts:
    """Find the residual ties on the normalised graph every stage uses (:func:`hessq.graph.traced`).

    Two quantizable layers are tied when their outputs reach the same residual add through
    BatchNorm / identity / dropout (and further adds) only — e.g. a ResNet block's last conv
    and its 1×1 shortcut conv — unless their family is not ``tied_at_add`` (embedding tables,
    whose lookups go onto grids of their own). An untraceable model gives a warning and no automatic ties.
    """
    layers = quantizable_layers(model)
    try:
        gm = traced(model)
    except Exception as exc:  # fx raises many kinds of errors
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "no automatic residual ties (pass ties= yourself, or auto_ties=False to silence this)",
            stacklevel=3,
        )
        return GraphFacts()
    graph = gm.graph
    modules = dict(gm.named_modules())
    facts = GraphFacts(traced=True)

    def family_name(node: fx.Node) -> str | None:
        family = family_of(node, modules)
        return family.name if family is not None else None

    def is_add(node: fx.Node) -> bool:
        return family_name(node) == "add" and not any(is_shape_arithmetic(a) for a in node.args)

    def is_transparent(node: fx.Node) -> bool:
        # per-channel affine or identity: the layer's output keeps its meaning
        is_bn = node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm)
        return is_bn or family_name(node) == "identity"

    def sources(node: fx.Node, seen: set[fx.Node]) -> list[str]:
        if node in seen:
            return []
        seen.add(node)
        if node.op == "call_module" and node.target in layers:
            # a family whose output is on a grid of its own before the add keeps its own bits (embedding lookups)
            family = family_of_module(layers[node.target])
            return [node.target] if family is None or getattr(family, "tied_at_add", True) else []
        if is_transparent(node) or is_add(node):
            found = []
            for arg in node.args:
                if isinstance(arg, fx.Node):
                    found += sources(arg, seen)
            return found
        return []

    done: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            arg = node.args[0] if node.args else None
            if isinstance(arg, fx.Node) and arg.op == "call_module" and arg.target in layers and len(arg.users) == 1:
                facts.bn_followed.add(arg.target)
        if not is_add(node) or node in done:
            continue
        # Only the outermost add of a chain forms a group; the inner ones are walked through.
        if any(is_add(u) for u in node.users):
            continue
        names = sources(node, done)
        unique = list(dict.fromkeys(names))
        if len(unique) > 1:
            facts.ties.append(unique)
    return facts


def merge_ties(names: Sequence[str], ties: Iterable[Iterable[str]]) -> list[list[str]]:
    """Union of overlapping ties: groups of layer names (every layer in exactly one group), in network order."""
    index = {n: i for i, n in enumerate(names)}
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for tie in ties:
        members = [index[n] for n in tie]
        for other in members[1:]:
            a, b = find(members[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[str]] = {}
    for i, n in enumerate(names):
        groups.setdefault(find(i), []).append(n)
    return [groups[k] for k in sorted(groups)]


def check_names(what: str, given: Iterable[str], known: Mapping[str, object] | Sequence[str]) -> None:
    """Raise naming every unknown layer in ``given``, with close matches."""
    import difflib

    known_list = list(known)
    unknown = [n for n in given if n not in known_list]
    if unknown:
        hints = []
        for n in unknown[:5]:
            close = difflib.get_close_matches(str(n), known_list, n=2)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise ConfigError(
            f"unknown layer name(s) in {what}: {', '.join(hints)}; the model's quantizable layers are "
            f"{known_list[:6]}{' …' if len(known_list) > 6 else ''} ({len(known_list)} in all)"
        )
