"""Rewriting a traced model into its fake-quantized form, by asking each node's op family.

1. Normalise: every op in its family's canonical form.
2. Fold BatchNorm into the weighted layer before it.
3. Check every op belongs to a family (or, with ``unsupported='float'``, leave it in float).
4. Swap each weighted layer for its family's quantized twin at the same module path.
5. Replace ops that make their own output grid (residual add, cat) with their requantizing module.
6. Quantize each tensor that enters a quantized layer once, sharing the quantizer among all the
   layers it feeds; a tensor already on a quantized grid (the output of a quantized add, or of an
   op that keeps its input's grid: ReLU, max-pool, reshape) is not quantized again.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterable, Mapping

import torch.fx as fx
from torch import nn

from hessq._errors import ConfigError
from hessq.graph._fold import fold_batchnorm
from hessq.graph._normalize import normalize
from hessq.graph._trace import UnsupportedOpError, trace
from hessq.ops import QuantLayer, describe, family_of, family_of_module, is_shape_arithmetic, node_location, weighted_module_types
from hessq.quantizer import RANGE_METHODS, ActQuantizer, Granularity, RangeMethod, check_granularity


def traced(model: nn.Module, leaf_modules: Iterable[str] = ()) -> fx.GraphModule:
    """The normalised fx graph of a copy of ``model``: what every pass and stage works on."""
    return normalize(trace(model, leaf_modules))


def pooled_bound(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[float, float] | None:
    """The fixed output range of the op averaged into ``node`` (ReLU6: [0, 6]), or None.

    Followed back through ops that keep the grid; an average (pooling, mean) must be on the way.
    Why only averages: a ReLU6 output is observed at millions of values and its calibrated
    percentile sits at 6 wherever it saturates, but its global average (the features a
    classifier reads) has only batch x channels values, so its percentile is the extreme
    of a few calibration images. On EfficientNet-Lite0, data distilled from BatchNorm
    statistics put that range at 0.62-0.68x the photos' and lost 0.4-1 point of agreement
    (bench/results/zeroq_ranges.md); on photos the bound moves agreement by 0.1 on average.
    """
    averaged = False
    while isinstance(node, fx.Node):
        family = family_of(node, modules)
        if family is None:
            return None
        if family.output_range is not None:
            return family.output_range if averaged else None
        if family.averaging:
            averaged = True
        elif not family.keeps_grid:
            return None
        node = node.args[0] if node.args else None
    return None


def check_supported(gm: fx.GraphModule, unsupported: str = "error") -> list[str]:
    """Raise one :class:`UnsupportedOpError` listing every op no family knows; with ``'float'`` return them.

    With ``'float'``, a warning names the quantizable layers (Conv2d, Linear, ...) left in float inside an
    unsupported module (``nn.MultiheadAttention``'s projections, an LSTM's...), which the plan cannot reach.
    """
    if unsupported not in ("error", "float"):
        raise ConfigError(f"unsupported must be 'error' or 'float', got {unsupported!r}")
    modules = dict(gm.named_modules())
    found, hidden = [], []
    constant: set[fx.Node] = set()  # parameters read directly and what is computed from them and sizes alone
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
            continue
        inputs = node.all_input_nodes
        if node.op != "output" and inputs and any(n in constant for n in inputs) \
                and all(n in constant or is_shape_arithmetic(n) for n in inputs):
            constant.add(node)  # computed once while compiling (a class token expanded to the batch)
            continue
        if node.op in ("placeholder", "output") or family_of(node, modules) is not None:
            continue
        found.append(f"{describe(node, modules)} ({node_location(node)})")
        if node.op == "call_module":
            inner = weighted_module_types()
            hidden += [f"{node.target}.{name}" if name else node.target
                       for name, m in modules[node.target].named_modules() if isinstance(m, inner)]
        weights = [n for n in node.all_input_nodes if n.op == "get_attr"]
        hidden += [f"{n.target} (a weight used by the {describe(node, modules)})" for n in weights]
    if found and unsupported == "error":
        listed = "\n".join(f"  - {f}" for f in found)
        raise UnsupportedOpError(
            f"hessq does not know how to quantize {len(found)} op{'s' if len(found) > 1 else ''} of this model:\n{listed}\n"
            "What to do: pass unsupported='float' to keep such ops in floating point between quantized layers (the "
            "model then has no integer-only form), rewrite that part of the model with supported ops, or register an "
            "op family for each (hessq.ops.register; hessq.ops.register_elementwise for an elementwise function)."
        )
    if hidden:
        warnings.warn(
            f"unsupported='float' leaves {len(hidden)} quantizable layer{'s' if len(hidden) > 1 else ''} in float "
            f"inside ops hessq cannot quantize: {', '.join(hidden)}. They get no bits from the plan.",
            stacklevel=3,
        )
    return found


def rewrite(
    model: nn.Module,
    layer_bits: Mapping[str, tuple[int, int] | None],
    *,
    weight_granularity: Granularity = "channel",
    num_groups: int = 1,
    block_size: int = 128,
    act_range: RangeMethod | str = "auto",
    percentile: float | None = None,
    default_act_bits: int = 8,
    residual_bits: int = 16,
    unsupported: str = "error",
    leaf_modules: Iterable[str] = (),
    activation_bounds: bool = True,
    graph_module: fx.GraphModule | None = None,
) -> fx.GraphModule:
    """The fake-quantized twin of ``model``: a GraphModule whose quantizers are not yet calibrated.

    ``layer_bits`` maps every quantizable layer's module path to (weight bits, activation
    bits), or to None to leave that layer in floating point. ``weight_granularity``: 'tensor', 'channel' (per output
    row), 'group' (``num_groups`` groups of output rows, Q-BERT) or 'block' (blocks of ``block_size`` input columns
    in each output row, GPTQ/AWQ-style); an embedding table is quantized per row (or in row groups). With ``activation_bounds``,
    a layer input that is an average of ReLU6 outputs is quantized on [0, 6] instead of a
    calibrated range (see :func:`pooled_bound`). ``act_range="auto"`` is ``"mse"`` for a model with a residual
    stream (a transformer: a LayerNorm) and ``"percentile"`` otherwise. ``residual_bits`` (8 or 16) is the grid of a transformer's residual
    stream: every LayerNorm's input, and the adds whose output only LayerNorms and adds read (see
    :func:`_widen_residual_stream`); matmul inputs keep their layers' activation bits.
    """
    # ``graph_module``: the model's normalised trace (:func:`traced`) when the caller has it already; rewritten in place
    check_granularity(weight_granularity, num_groups, block_size)
    if act_range != "auto" and act_range not in RANGE_METHODS:
        raise ConfigError(f"act_range must be 'auto' or one of {RANGE_METHODS}, got {act_range!r}")
    if residual_bits not in (8, 16):
        raise ConfigError(f"residual_bits must be 8 or 16, got {residual_bits!r}")
    gm = graph_module if graph_module is not None else traced(model, leaf_modules)
    gm.eval()
    fold_batchnorm(gm)
    float_ops = check_supported(gm, unsupported)
    modules = dict(gm.named_modules())
    graph = gm.graph
    if act_range == "auto":
        act_range = "mse" if _has_residual_stream(graph, modules) else "percentile"

    def new_act_quantizer(bound: tuple[float, float] | None = None) -> ActQuantizer:
        return ActQuantizer(default_act_bits, act_range, percentile, bound=bound)

    # quantized twins, same module paths.
    layer_nodes: dict[fx.Node, QuantLayer] = {}
    twins: dict[str, QuantLayer] = {}
    for node in graph.nodes:
        family = family_of_module(modules[node.target]) if node.op == "call_module" else None
        if family is None or not family.weighted:
            continue
        if node.target not in layer_bits:
            raise ConfigError(f"no bit width given for layer `{node.target}`")
        if layer_bits[node.target] is None:
            continue
        if node.target in twins:  # a layer the model runs more than once (ALBERT's shared layers): one twin
            layer_nodes[node] = twins[node.target]
            continue
        w_bits, a_bits = layer_bits[node.target]
        extra = {"block_size": block_size} if weight_granularity == "block" else {}
        try:
            twin = family.quantized_module(modules[node.target], w_bits, a_bits, weight_granularity, num_groups, **extra)
        except ConfigError as exc:
            raise ConfigError(f"layer `{node.target}`: {exc}") from None
        if getattr(twin, "index_input", False):
            # a lookup (embedding): its input is ids, its output goes on a grid of its own with the rewrite's range settings
            twin.output_quantizer = new_act_quantizer()
            twin.output_quantizer.set_bits(a_bits)
        gm.set_submodule(node.target, twin)
        layer_nodes[node] = twins[node.target] = twin
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    missing = set(layer_bits) - called
    if missing:
        raise ConfigError(f"bit widths given for {sorted(missing)}, which are not quantizable layers the model calls")

    # in topological order: grid[node] is the quantizer whose grid node's value lies on.
    grid: dict[fx.Node, ActQuantizer] = {}
    # values computed only from layers the plan leaves in float: an add, cat or activation of such values stays
    # float (a plan of all None is the FP32 model); the model input counts as quantized (its first layer is)
    float_only = _float_only_values(graph, modules, layer_bits)
    batch_constant = _batch_constant_values(graph)  # before the loop below replaces nodes
    input_quant_node: dict[fx.Node, fx.Node] = {}
    quantizer_nodes: dict[fx.Node, ActQuantizer] = {}
    calls = collections.Counter(n.target for n in layer_nodes)
    shared_inputs: dict[str, ActQuantizer] = {}
    made: dict[str, int] = {}
    for node in list(graph.nodes):
        if node in layer_nodes and getattr(layer_nodes[node], "index_input", False):
            grid[node] = layer_nodes[node].output_quantizer
            continue
        if node in layer_nodes and calls[node.target] > 1:
            # a layer run more than once takes every input onto one grid of its own (its integer bias and
            # accumulator scale are one), requantized there from whatever grid each call's input is on
            src = node.args[0]
            qname = f"{node.target}.input_quantizer"
            if qname not in shared_inputs:
                shared_inputs[qname] = new_act_quantizer()
                gm.add_submodule(qname, shared_inputs[qname])
            q = shared_inputs[qname]
            with graph.inserting_after(src):
                qnode = graph.call_module(qname, (src,))
            qnode.meta = dict(node.meta)
            node.replace_input_with(src, qnode)
            grid[qnode] = quantizer_nodes[qnode] = q
            layer_nodes[node].set_input_quantizer(q)
            continue
        if node in layer_nodes:
            src = node.args[0]
            if src not in grid:
                if src not in input_quant_node:
                    q = new_act_quantizer(pooled_bound(src, modules) if activation_bounds else None)
                    qname = f"{node.target}.input_quantizer"
                    gm.add_submodule(qname, q)
                    with graph.inserting_after(src):
                        input_quant_node[src] = graph.call_module(qname, (src,))
                    input_quant_node[src].meta = dict(node.meta)
                    grid[input_quant_node[src]] = q
                    quantizer_nodes[input_quant_node[src]] = q
                node.replace_input_with(src, input_quant_node[src])
                src = input_quant_node[src]
            layer_nodes[node].set_input_quantizer(grid[src])
            continue
        family = family_of(node, modules)
        if family is None or node in float_only:
            continue
        replacement = family.requantizing_module(node, new_act_quantizer)
        if replacement is not None:
            module, args = replacement
            q = getattr(module, "output_quantizer", None)
            name = f"quant_{family.name}_{made.get(family.name, 0)}"
            made[family.name] = made.get(family.name, 0) + 1
            gm.add_submodule(name, module)
            with graph.inserting_after(node):
                new = graph.call_module(name, tuple(args))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if q is not None:  # an op without a grid of its own (a matmul of activations): its consumer quantizes
                grid[new] = quantizer_nodes[new] = q
        elif family.keeps_grid and node.args and isinstance(node.args[0], fx.Node) and node.args[0] in grid:
            grid[node] = grid[node.args[0]]

    for node in batch_constant:
        if node in grid:
            grid[node].observer.batch_constant = True

    # Each quantizer gets the widest activation bits among the layers it feeds.
    for qnode, q in quantizer_nodes.items():
        bits = _consumer_act_bits(qnode, layer_nodes, quantizer_nodes)
        q.set_bits(max(bits) if bits else default_act_bits)
    _widen_residual_stream(gm, quantizer_nodes, residual_bits)

    graph.lint()
    gm.recompile()
    gm.hessq_float_ops = float_ops
    return gm


def _float_only_values(graph: fx.Graph, modules: Mapping[str, nn.Module], layer_bits: Mapping) -> set[fx.Node]:
    """Nodes whose tensor inputs all come from weighted layers the plan leaves in float (and nothing quantized).

    Values no weighted layer reaches (a BERT's attention-mask bias, its position ids) do not decide: scores of float
    layers plus the mask bias stay float, so a plan of all None is the FP32 model for a transformer too."""
    float_only: set[fx.Node] = set()
    layer_free: set[fx.Node] = set()  # computed from the inputs and constants alone
    for node in graph.nodes:
        family = family_of_module(modules[node.target]) if node.op == "call_module" else None
        if family is not None and family.weighted:
            if layer_bits.get(node.target, ()) is None:
                float_only.add(node)
            continue
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
        if all(n in layer_free for n in inputs):
            layer_free.add(node)
            continue
        if all(n in float_only or n in layer_free for n in inputs):
            float_only.add(node)
    return float_only


def _batch_constant_values(graph: fx.Graph) -> set[fx.Node]:
    """Tensor nodes no input value reaches, only the inputs' sizes past the batch dimension (BERT's positions
    built from ``input_ids.size(1)``, and their embeddings): the same tensor for every batch of one shape."""
    shapes: set[fx.Node] = set()  # sizes past dim 0, devices, dtypes: facts about the inputs, not their values
    constant: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "call_method" and node.target == "size" and len(node.args) > 1 and node.args[1] != 0:
            shapes.add(node)
        elif node.op == "call_function" and node.target is getattr and node.args[1] in ("device", "dtype"):
            shapes.add(node)
        elif node.op == "get_attr" or (node.op in ("call_module", "call_function", "call_method") and all(
                n in constant or n in shapes for n in node.all_input_nodes)):
            constant.add(node)
    return constant


def _has_residual_stream(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> bool:
    """Whether an op of the graph reads a transformer's residual stream (a LayerNorm)."""
    return any(getattr(family_of(node, modules), "reads_residual", False) for node in graph.nodes)


def _widen_residual_stream(gm: fx.GraphModule, quantizer_nodes: Mapping[fx.Node, ActQuantizer], bits: int) -> None:
    """Put a transformer's residual stream on ``bits``-bit grids: the input of every op that reads it (LayerNorm),
    and the output of every op that can carry it (add) when all its consumers read or carry it.

    MiniLM's residual stream has outlier channels tens of times the typical value; on one 8-bit grid per tensor
    they leave the rest a few steps (W8A8 tweets 84.7 against 87.1 with a 16-bit stream, bench/qbert_activations.py),
    and I-BERT keeps this stream wide too. No matmul reads it, so the int8 kernels are untouched.
    """
    modules = dict(gm.named_modules())

    def role(node: fx.Node) -> str | None:
        if node.op == "call_module" and isinstance(modules[node.target], QuantLayer):
            return "other"  # a quantized layer reads 8-bit codes (its twin is no family's float module)
        family = family_of_module(modules[node.target]) if node.op == "call_module" else None
        if family is None:
            return None
        return "reads" if family.reads_residual else ("carries" if family.carries_residual else "other")

    def only_residual_consumers(start: fx.Node) -> bool:
        stack, seen, found = list(start.users), set(), False
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            r = role(node)
            if r in ("reads", "carries"):
                found = True
            elif r is not None or node.op == "output" or node in quantizer_nodes:
                return False
            else:
                stack.extend(node.users)  # dropout, reshapes: the same values
        return found

    for node in gm.graph.nodes:
        r = role(node)
        if r == "reads":
            # a LayerNorm of float-only values (the plan left every layer before it in float) has no quantizer
            if hasattr(modules[node.target], "input_quantizer"):
                modules[node.target].input_quantizer.set_bits(bits)
        elif r == "carries" and node in quantizer_nodes and only_residual_consumers(node):
            quantizer_nodes[node].set_bits(bits)


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


def quantized_layers(gm: nn.Module) -> dict[str, QuantLayer]:
    """The quantized twins in a rewritten model, by module path."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, QuantLayer)}


def act_quantizers(gm: nn.Module) -> dict[str, ActQuantizer]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, ActQuantizer)}
