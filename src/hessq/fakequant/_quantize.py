"""hessq.quantize(): a bit plan applied to any traceable model, calibrated on a few batches."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from hessq._checks import check_inputs, check_model, reiterable, shape_of
from hessq._utils import batch_inputs, model_device, move_to, pad_token_id_of, training_mode
from hessq._errors import ConfigError, HessqError, InputDataError, ModelError
from hessq.graph import act_quantizers, capture, quantizable_layers, rewrite, traced
from hessq.quantizer import Granularity, RangeMethod, check_act_bits, check_weight_bits
from hessq.fakequant._model import QuantizedModel

#: An int b (weights b bits, activations 8), a (weight_bits, act_bits) pair, or a mapping
#: layer name -> either, or None to keep that layer in floating point (a BitPlan is such
#: a mapping, with an ``act_bits`` default).
_UNSET: Any = object()

Plan = Union[int, tuple[int, int], Mapping[str, Union[int, tuple[int, int], None]]]


def _bits_pair(value: Any, default_act: int, where: str) -> tuple[int, int]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        w, a = value
    elif isinstance(value, int) and not isinstance(value, bool):
        w, a = value, default_act
    else:
        raise ConfigError(f"{where}: expected weight bits or a (weight_bits, act_bits) pair, got {value!r}")
    try:
        return check_weight_bits(w), check_act_bits(a)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def layer_call_order(model: nn.Module, leaf_modules: Iterable[str] = (), *, graph_module: fx.GraphModule | None = None) -> list[str]:
    """Quantizable layer paths in the order the forward pass calls them (on ``graph_module``, the model's
    normalised trace from :func:`hessq.graph.traced`, when given; else on a new trace)."""
    gm = graph_module if graph_module is not None else traced(model, leaf_modules)
    layers = quantizable_layers(model)
    order = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in layers]
    seen: set[str] = set()
    return [n for n in order if not (n in seen or seen.add(n))]


def resolve_plan(
    plan: Plan, layer_names: list[str], pin_first_last: int | None = 8
) -> dict[str, tuple[int, int] | None]:
    """Layer name -> (weight bits, activation bits), or None for float, for every layer in ``layer_names``.

    A uniform plan (int or pair) keeps the first and last layer at ``pin_first_last`` bits
    for weights and activations (None: no exception). A per-layer mapping is taken as
    given and must name every layer; a layer mapped to None stays in floating point.
    """
    if isinstance(plan, Mapping):
        default_act = getattr(plan, "act_bits", 8)
        unknown = [n for n in plan if n not in layer_names]
        if unknown:
            raise ModelError(f"the plan names {len(unknown)} layer(s) the model does not have: {unknown[:5]}; the "
                             f"model's quantizable layers are {layer_names[:5]}{' …' if len(layer_names) > 5 else ''}. "
                             "A plan made for another model does not fit: re-plan for this model, or fix the names")
        missing = [n for n in layer_names if n not in plan]
        if missing:
            raise ConfigError(f"the plan gives no bits for layers {missing[:5]}; a per-layer plan must name every quantizable layer")
        return {n: None if plan[n] is None else _bits_pair(plan[n], default_act, f"plan[{n!r}]") for n in layer_names}
    uniform = _bits_pair(plan, 8, "plan")
    bits = {n: uniform for n in layer_names}
    if pin_first_last is not None and layer_names:
        edge = _bits_pair((pin_first_last, pin_first_last if pin_first_last in (4, 8, 16) else 8), 8, "pin_first_last")
        bits[layer_names[0]] = edge
        bits[layer_names[-1]] = edge
    return bits


def _expected_input(qmodel: nn.Module) -> str:
    """What the first layer called takes, e.g. "(batch, 1, H, W)", or "" when unknown."""
    first = next(iter(getattr(qmodel, "layer_bits", {})), None)
    try:
        layer = qmodel.get_submodule(first) if first is not None else None
    except AttributeError:
        return ""
    if getattr(layer, "in_channels", None) is not None:
        return f"; its first layer {first!r} takes (batch, {layer.in_channels}, H, W)"
    if getattr(layer, "in_features", None) is not None:
        return f"; its first layer {first!r} takes (batch, ..., {layer.in_features})"
    return ""


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches: Iterable, *, progress: bool = False) -> int:
    """Set every activation range from ``batches`` (inputs or (inputs, targets)); returns the batch count.

    The batches are read once, in order. Each batch's inputs are checked (uint8 pixels, another
    float dtype than the model's, NaN: :class:`InputDataError` with the conversion to make); inputs
    the model cannot take (a wrong shape) are an InputDataError naming the shape given and the one
    the first layer expects. No batch at all is an InputDataError.
    """
    quantizers = act_quantizers(qmodel)
    for q in quantizers.values():
        q.observer.reset()
        q.observing = True
    device = model_device(qmodel)
    count = 0
    # no autograd: calibration only reads ranges, and a graph kept per batch cost a BERT at T=256 gigabytes
    with training_mode(qmodel, False), torch.no_grad():
        try:
            for batch in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
                x = check_inputs(batch_inputs(batch, pad_token_id_of(qmodel)), qmodel, where=f"calibration batch {count} inputs")
                try:
                    qmodel(move_to(x, device))
                except HessqError:
                    raise
                except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                    if count:
                        raise  # the first batch ran: not a matter of the inputs' shape
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise InputDataError(
                        f"the model cannot run on calibration batch 0: inputs of shape {shape_of(x)}"
                        f"{_expected_input(qmodel)} ({type(exc).__name__}: {first}). Give batches shaped as the model "
                        "takes them (inputs, or (inputs, targets) pairs)") from exc
                count += 1
                # the integer model is compiled for this per-sample input shape
                if isinstance(x, torch.Tensor):
                    qmodel.input_shape = tuple(x.shape[1:])
        finally:
            for q in quantizers.values():
                q.observing = False
    if count == 0:
        raise InputDataError("calibration needs at least one batch of inputs; got none (an empty list or loader?)")
    for q in quantizers.values():
        q.freeze()
    return count


def _apply_row_bits(gm: nn.Module, plan: Plan, layer_bits: Mapping[str, tuple[int, int] | None]) -> None:
    """A plan's ``row_bits`` (tables whose rows have widths of their own) given to the tables' quantizers."""
    for name, widths in (getattr(plan, "row_bits", None) or {}).items():
        wq = getattr(gm.get_submodule(name), "weight_quantizer", None)
        if not hasattr(wq, "set_row_bits") or layer_bits.get(name) is None:
            raise ConfigError(f"the plan gives rows of {name!r} widths of their own, but it is not a quantized "
                              "embedding table: only tables have rows of their own widths")
        rows_total = gm.get_submodule(name).weight.shape[0]
        per_row = torch.full((rows_total,), layer_bits[name][0], dtype=torch.int8)
        for b, rows in widths.items():
            rows = torch.as_tensor(rows, dtype=torch.long)
            if rows.numel() and int(rows.max()) >= rows_total:
                raise ConfigError(f"the plan's row bits name row {int(rows.max())} of {name!r}, which has "
                                  f"{rows_total} rows: the plan was made for another table")
            per_row[rows] = b
        wq.set_row_bits(per_row)


def quantize(
    model: nn.Module,
    plan: Plan,
    calibration_batches: Iterable,
    *,
    pin_first_last: int | None = 8,
    weight_granularity: Granularity = "channel",
    num_groups: int = 1,
    block_size: int = 128,
    act_range: RangeMethod | str = "auto",
    percentile: float | None = None,
    unsupported: str = "error",
    leaf_modules: Iterable[str] = (),
    activation_bounds: bool = True,
    residual_bits: int = 16,
    progress: bool = False,
    first_last_bits: Any = _UNSET,
) -> QuantizedModel:
    """The fake-quantized copy of ``model`` under ``plan``, calibrated; ``model`` is left untouched.

    ``plan``: an int b (weights b bits, activations 8 bits), a (weight_bits, act_bits)
    pair, or a mapping layer name -> either (e.g. a BitPlan) or None (keep that layer
    in floating point, as ZeroQ's one-layer-at-a-time sensitivity needs). Uniform plans keep the
    first and last layer at ``pin_first_last`` bits (None to quantize them like the rest; the same name
    as :func:`hessq.plan_bits`'s; ``first_last_bits=`` is its deprecated spelling, kept for one release).
    Weights are quantized per output channel (``weight_granularity='tensor'``, ``'group'``: ``num_groups``
    groups of output rows as in Q-BERT, or ``'block'``: one scale per ``block_size`` input columns of each output
    row, GPTQ/AWQ-style; block-wise layers have no integer form, so such a model evaluates in float fake
    quantization); embedding tables are quantized per row (row groups with ``'group'``); activation ranges come from ``act_range``
    ('minmax', 'percentile', 'ema', 'mse', or 'auto': 'mse' for a transformer, 'percentile' otherwise) over
    ``calibration_batches``. 'mse' clips each activation where the squared quantization error of a sample of its
    values is least; on MiniLM's LayerNorm outputs, whose few outlier channels a percentile keeps, it is worth
    2 points of W8A8 tweets accuracy (bench/qbert_activations.py). 'percentile' clips each
    activation at a percentile chosen by its bits (99.99 at 8 bits, 99.7 at 4, none at 16; see
    :func:`hessq.quantizer.default_percentile`) unless ``percentile`` is given. With
    ``activation_bounds`` (default), a layer input that is a global or local average of
    ReLU6 outputs (EfficientNet-Lite's and MobileNet's pooled features) is quantized on its
    provable range [0, 6] instead: calibrating it means estimating an extreme from a few
    numbers per image, and on EfficientNet-Lite0 that cost distilled calibration 0.4-1 point
    of agreement (bench/results/zeroq_ranges.md). ``residual_bits`` (16, or 8) is the grid of a transformer's
    residual stream (LayerNorm inputs and the adds feeding them, as I-BERT keeps it wide): no matmul reads it, so
    "W8A8" still means 8-bit inputs to every matmul; 8 puts the stream on 8-bit grids too.

    ``calibration_batches`` must be re-iterable (a list of batches or a DataLoader): a one-shot
    iterator or generator is refused with an :class:`InputDataError`, so that the same data
    can go on to later stages (fine-tuning, evaluation) instead of arriving there exhausted;
    pass ``list(it)``. Calibration reads the batches once; each is checked as :func:`calibrate`
    says (dtype, NaN, shape).

    ``model`` must be an ``nn.Module`` with real, finite weights (:class:`ModelError` otherwise).
    A plan with a model ``signature`` (a :class:`hessq.BitPlan` from the planner) is refused
    with a :class:`ModelError` for a model whose layers or weight shapes differ, naming them.

    The result is a :class:`QuantizedModel` whose Conv2d/Linear layers are quantized
    twins at the same module paths; ``result.layer_bits`` records the plan applied. Its
    eval mode computes exactly what the integer model computes.
    """
    if first_last_bits is not _UNSET:
        warnings.warn("hessq.quantize(first_last_bits=...) is deprecated: use pin_first_last=..., the name plan_bits "
                      "and compress use", DeprecationWarning, stacklevel=2)
        pin_first_last = first_last_bits
    model = capture(check_model(model, "model"))
    reiterable(calibration_batches, what="calibration_batches")
    if isinstance(plan, Mapping) and getattr(plan, "signature", None) and callable(getattr(plan, "check_model", None)):
        plan.check_model(model)  # a BitPlan for another model: names the layers that differ
    leaf_modules = list(leaf_modules)
    gm = traced(model, leaf_modules)  # the one trace: the layer order and the rewrite both read it
    order = layer_call_order(model, graph_module=gm)
    if not order:
        raise ModelError(f"{type(model).__name__} calls no Conv2d or Linear layer; there is nothing to quantize")
    layer_bits = resolve_plan(plan, order, pin_first_last)
    device = model_device(model)
    # a float64 model's quantizers hold their ranges and scales in float64 too (it trains in float64); otherwise float32
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in model.parameters()) else torch.float32
    gm = rewrite(
        model,
        layer_bits,
        graph_module=gm,
        weight_granularity=weight_granularity,
        num_groups=num_groups,
        block_size=block_size,
        act_range=act_range,
        percentile=percentile,
        unsupported=unsupported,
        leaf_modules=leaf_modules,
        activation_bounds=activation_bounds,
        residual_bits=residual_bits,
    ).to(device=device, dtype=dtype)
    _apply_row_bits(gm, plan, layer_bits)
    qmodel = QuantizedModel(gm, layer_bits, gm.hessq_float_ops)
    # a captured text model's padding token: its integer model pads shorter inputs to its compiled length
    qmodel.pad_token_id = getattr(model, "pad_token_id", None)
    calibrate(qmodel, calibration_batches, progress=progress)
    return qmodel
