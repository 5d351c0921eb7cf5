"""Rewriting a traced model into its fake-quantized form.

1. Fold BatchNorm into the conv before it.
2. Check every op is one hessq knows (or, with ``unsupported='float'``, leave it in float).
3. Swap each Conv2d/Linear for its quantized twin at the same module path.
4. Replace residual adds of two tensors with :class:`QuantAdd`.
5. Quantize each tensor that enters a quantized layer once, sharing the quantizer among
   all the layers it feeds; a tensor already on a quantized grid (the output of a
   quantized add, or of ReLU / max-pool / reshape of one) is not quantized again.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.graph._fold import fold_batchnorm
from hessq.graph._qmodules import QUANT_LAYER_TYPES, QuantAdd, QuantCat, QuantConv2d, QuantLinear
from hessq.graph._trace import UnsupportedOpError, node_location, trace
from hessq.quantizer import ActQuantizer
from hessq.quantizer._functional import Granularity
from hessq.quantizer._observer import RangeMethod

# Ops that keep values on the grid of their input (no arithmetic on the codes).
_GRID_MODULES = (nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.ZeroPad2d)  # zero padding: 0 is on every grid
_GRID_FUNCTIONS = {F.relu, torch.relu, torch.flatten, F.max_pool2d, F.dropout, operator.getitem}
_GRID_METHODS = {"relu", "view", "reshape", "flatten", "contiguous"}

# Ops that are fine between quantized layers but change values (the next layer requantizes).
_OTHER_MODULES = (nn.ReLU6, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_OTHER_FUNCTIONS = {F.relu6, F.avg_pool2d, F.adaptive_avg_pool2d, torch.cat, torch.mean, getattr, operator.add, torch.add}
_OTHER_METHODS = {"size", "mean", "add", "dim"}

_ADD_FUNCTIONS = {operator.add, torch.add}

# Averages: their output lies within the range of their input.
_AVERAGING_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_AVERAGING_FUNCTIONS = {F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean}
RELU6_BOUND = (0.0, 6.0)


def _op_name(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {type(modules[node.target]).__name__} `{node.target}`"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    target = node.target
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    return f"function {mod + '.' if mod else ''}{name}"


def _is_known(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.Conv2d, nn.Linear) + _GRID_MODULES + _OTHER_MODULES)
    if node.op == "call_method":
        return node.target in _GRID_METHODS | _OTHER_METHODS
    return node.target in _GRID_FUNCTIONS | _OTHER_FUNCTIONS


def _is_grid_preserving(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _GRID_MODULES)
    if node.op == "call_method":
        return node.target in _GRID_METHODS
    return node.op == "call_function" and node.target in _GRID_FUNCTIONS


def _is_relu6(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU6)
    return node.op == "call_function" and node.target is F.relu6


def _is_averaging(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _AVERAGING_MODULES)
    if node.op == "call_method":
        return node.target == "mean"
    return node.op == "call_function" and node.target in _AVERAGING_FUNCTIONS


def pooled_relu6_bound(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[float, float] | None:
    """[0, 6] when ``node`` is an average of a ReLU6 output (through reshapes, ReLU, max-pool), else None.

    Why only averages: a ReLU6 output is observed at millions of values and its calibrated
    percentile sits at 6 wherever it saturates, but its global average (the features a
    classifier reads) has only batch x channels values, so its percentile is the extreme
    of a few calibration images. On EfficientNet-Lite0, data distilled from BatchNorm
    statistics put that range at 0.62-0.68x the photos' and lost 0.4-1 point of agreement
    (bench/results/zeroq_ranges.md); on photos the bound moves agreement by 0.1 on average.
    """
    averaged = False
    while isinstance(node, fx.Node) and node.op in ("call_module", "call_function", "call_method"):
        if node.op == "call_module" and node.target not in modules:
            return None  # a quantized add or cat inserted by the rewrite: not a ReLU6
        if _is_relu6(node, modules):
            return RELU6_BOUND if averaged else None
        if _is_averaging(node, modules):
            averaged = True
        elif not _is_grid_preserving(node, modules) or node.target is operator.getitem:
            return None
        node = node.args[0] if node.args else None
    return None


def _is_tensor_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add"
    )
    return (
        is_add
        and len(node.args) == 2
        and all(isinstance(a, fx.Node) and not _is_shape_arithmetic(a) for a in node.args)
        and not node.kwargs
    )


def _tensor_cat(node: fx.Node) -> tuple[list[fx.Node], int] | None:
    """(inputs, dim) for torch.cat of a list of tensors, else None."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors) or not isinstance(dim, int):
        return None
    return list(tensors), dim


def _is_shape_arithmetic(node: fx.Node) -> bool:
    # x.size(0) + 1 and friends are Python ints at run time, not tensors to quantize.
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target in (getattr, operator.getitem):
        return _is_shape_arithmetic(node.args[0]) if isinstance(node.args[0], fx.Node) else True
    return False


def check_supported(gm: fx.GraphModule, unsupported: str = "error") -> list[str]:
    """Raise :class:`UnsupportedOpError` for the first op hessq does not know; list them all if ``'float'``."""
    if unsupported not in ("error", "float"):
        raise ConfigError(f"unsupported must be 'error' or 'float', got {unsupported!r}")
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if _is_known(node, modules):
            continue
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            problem = f"BatchNorm2d `{node.target}` does not directly follow a Conv2d (used by nothing else), so it cannot be folded"
        else:
            problem = f"hessq does not know how to quantize the {_op_name(node, modules)}"
        if unsupported == "error":
            raise UnsupportedOpError(
                f"{problem} ({node_location(node)}).\nWhat to do: pass unsupported='float' to keep such ops in "
                "floating point between quantized layers (the model then has no integer-only form), or "
                "rewrite that part of the model with supported ops (Conv2d, Linear, BatchNorm2d after a conv, "
                "ReLU, max/average pooling, flatten/reshape, add, cat)."
            )
        found.append(f"{_op_name(node, modules)} ({node_location(node)})")
    return found


def rewrite(
    model: nn.Module,
    layer_bits: Mapping[str, tuple[int, int] | None],
    *,
    weight_granularity: Granularity = "channel",
    num_groups: int = 1,
    act_range: RangeMethod = "percentile",
    percentile: float | None = None,
    default_act_bits: int = 8,
    unsupported: str = "error",
    leaf_modules: Iterable[str] = (),
    activation_bounds: bool = True,
) -> fx.GraphModule:
    """The fake-quantized twin of ``model``: a GraphModule whose quantizers are not yet calibrated.

    ``layer_bits`` maps every quantizable layer's module path to (weight bits, activation
    bits), or to None to leave that layer in floating point. With ``activation_bounds``,
    a layer input that is an average of ReLU6 outputs is quantized on [0, 6] instead of a
    calibrated range (see :func:`pooled_relu6_bound`).
    """
    gm = trace(model, leaf_modules)
    gm.eval()
    fold_batchnorm(gm)
    float_ops = check_supported(gm, unsupported)
    modules = dict(gm.named_modules())
    graph = gm.graph

    def new_act_quantizer(bound: tuple[float, float] | None = None) -> ActQuantizer:
        return ActQuantizer(default_act_bits, act_range, percentile, bound=bound)

    # 3. quantized twins, same module paths.
    layer_nodes: dict[fx.Node, nn.Module] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            continue
        if node.target not in layer_bits:
            raise ConfigError(f"no bit width given for layer `{node.target}`")
        if layer_bits[node.target] is None:
            continue
        w_bits, a_bits = layer_bits[node.target]
        original = modules[node.target]
        cls = QuantConv2d if isinstance(original, nn.Conv2d) else QuantLinear
        twin = cls(original, w_bits, a_bits, weight_granularity, num_groups)
        gm.set_submodule(node.target, twin)
        layer_nodes[node] = twin
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    missing = set(layer_bits) - called
    if missing:
        raise ConfigError(f"bit widths given for {sorted(missing)}, which are not quantizable layers the model calls")

    # 4 and 5, in topological order: grid[node] is the quantizer whose grid node's value lies on.
    grid: dict[fx.Node, ActQuantizer] = {}
    input_quant_node: dict[fx.Node, fx.Node] = {}
    quantizer_nodes: dict[fx.Node, ActQuantizer] = {}
    add_count = cat_count = 0
    for node in list(graph.nodes):
        cat = _tensor_cat(node)
        if cat is not None:
            name = f"quant_cat_{cat_count}"
            cat_count += 1
            q = new_act_quantizer()
            gm.add_submodule(name, QuantCat(q, cat[1]))
            with graph.inserting_after(node):
                new = graph.call_module(name, tuple(cat[0]))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            grid[new] = q
            quantizer_nodes[new] = q
        elif _is_tensor_add(node):
            name = f"quant_add_{add_count}"
            add_count += 1
            q = new_act_quantizer()
            gm.add_submodule(name, QuantAdd(q))
            with graph.inserting_after(node):
                new = graph.call_module(name, tuple(node.args))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            grid[new] = q
            quantizer_nodes[new] = q
        elif node in layer_nodes:
            src = node.args[0]
            if src in grid:
                q = grid[src]
            else:
                if src not in input_quant_node:
                    q = new_act_quantizer(pooled_relu6_bound(src, modules) if activation_bounds else None)
                    qname = f"{node.target}.input_quantizer"
                    gm.add_submodule(qname, q)
                    with graph.inserting_after(src):
                        input_quant_node[src] = graph.call_module(qname, (src,))
                    input_quant_node[src].meta = dict(node.meta)
                    grid[input_quant_node[src]] = q
                    quantizer_nodes[input_quant_node[src]] = q
                qnode = input_quant_node[src]
                q = grid[qnode]
                node.replace_input_with(src, qnode)
            layer_nodes[node].set_input_quantizer(q)
        elif node.op != "output" and node.args and isinstance(node.args[0], fx.Node) and node.args[0] in grid:
            if _is_grid_preserving(node, modules):
                grid[node] = grid[node.args[0]]

    # Each quantizer gets the widest activation bits among the layers it feeds.
    for qnode, q in quantizer_nodes.items():
        bits = _consumer_act_bits(qnode, layer_nodes, quantizer_nodes)
        q.set_bits(max(bits) if bits else default_act_bits)

    graph.lint()
    gm.recompile()
    gm.hessq_float_ops = float_ops
    return gm


def _consumer_act_bits(start: fx.Node, layer_nodes: Mapping[fx.Node, nn.Module], quantizer_nodes) -> list[int]:
    """Activation bits of the quantized layers reached from ``start`` before another requantization."""
    bits, stack, seen = [], list(start.users), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in layer_nodes:
            bits.append(layer_nodes[node].a_bits)
        elif node not in quantizer_nodes:
            stack.extend(node.users)
    return bits


def quantized_layers(gm: nn.Module) -> dict[str, nn.Module]:
    """The quantized twins in a rewritten model, by module path."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}


def act_quantizers(gm: nn.Module) -> dict[str, ActQuantizer]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, ActQuantizer)}
