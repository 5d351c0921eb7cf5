"""The public entry points: per-layer Hessian sensitivity, whole-model trace, eigenvalues, density.

Every entry point checks its arguments, the model and the batches before the first Hessian-vector
product (one cheap forward of the first batch included), so a mistake is one clear
:class:`hessq.HessqError`, not a torch error deep inside an HVP or a silently odd result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hessq._checks import (
    check_class_targets,
    check_inputs,
    check_int,
    check_model,
    check_number,
    shape_of,
    split_batch,
)
from hessq._errors import ConfigError, ConfigTypeError, HessqError, InputDataError
from hessq._utils import TARGET_KEYS, move_to
from hessq.graph import capture, quantizable_layers
from hessq.sensitivity import _distributed as D
from hessq.sensitivity import _traces as T
from hessq.sensitivity._density import SpectralDensity, slq
from hessq.sensitivity._eigen import power_iteration
from hessq.sensitivity._hutchinson import TraceEstimate, hutchinson
from hessq.sensitivity._hvp import HessianOperator, batch_size, run_model, sub_generator
from hessq.sensitivity._result import LayerSensitivity, Sensitivity, model_signature

LossFn = Callable[[Any, Any], torch.Tensor]

#: min_samples when not given: 10, or max_samples when that is smaller.
DEFAULT_MIN_SAMPLES = 10


# --- argument checks ------------------------------------------------------------------------


def _sample_counts(rtol: Any, max_samples: Any, min_samples: Any) -> tuple[float, int, int]:
    rtol = check_number(rtol, "rtol", low=0)
    max_samples = check_int(max_samples, "max_samples", low=1)
    if min_samples is None:
        return rtol, max_samples, min(DEFAULT_MIN_SAMPLES, max_samples)
    min_samples = check_int(min_samples, "min_samples", low=1)
    if min_samples > max_samples:
        raise ConfigError(f"min_samples ({min_samples}) is more than max_samples ({max_samples}); "
                          "lower min_samples or raise max_samples")
    return rtol, max_samples, min_samples


def _check_names(layers: Any) -> list[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise ConfigTypeError(f"layers must be a list of layer names, got {layers!r}"
                              + (f"; for one layer write layers=[{layers!r}]" if isinstance(layers, str) else ""))
    layers = list(layers)
    if not layers:
        raise ConfigError("layers is empty: name at least one layer, or pass layers=None for all of them")
    bad = [n for n in layers if not isinstance(n, str)]
    if bad:
        raise ConfigTypeError(f"layers must hold layer names (strings), got {bad[:3]}")
    return layers


def _check_loss_fn(loss_fn: Any) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigTypeError(f"loss_fn must be a function (outputs, targets) -> mean loss, or None for "
                              f"cross-entropy; got {type(loss_fn).__name__}")


def _is_batch(obj: Any) -> bool:
    if isinstance(obj, Mapping):  # a Hugging Face batch dict with its labels
        return any(k in obj for k in TARGET_KEYS)
    return isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], (torch.Tensor, dict))


def _local_batches(batches: Any, group, model: nn.Module) -> tuple[list[tuple[int, Any]], int]:
    """This rank's (global index, batch) pairs (round robin), and the number of batches in all.

    ``batches`` is read once, here, and kept: a generator or a one-shot iterator is fine, since
    every product afterwards reads the list. Every batch (every rank's, so that all ranks refuse
    the same data instead of some waiting forever) must be an (inputs, targets) pair whose inputs
    the model can take: its float dtype, no NaN or inf.
    """
    if _is_batch(batches):
        batches = [batches]
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise InputDataError(f"batches must be one (inputs, targets) batch or an iterable of them (a list, a "
                             f"DataLoader), got {type(batches).__name__}")
    mine, count = [], 0
    for b, batch in enumerate(batches):
        count += 1
        try:
            inputs, targets = split_batch(batch, model=model)
        except InputDataError as exc:
            raise InputDataError(f"batch {b}: {exc}") from None
        check_inputs(inputs, model, where=f"batch {b}'s inputs")
        if D.owns(b, group):
            mine.append((b, (inputs, targets)))
    if count == 0:
        raise InputDataError("no data: `batches` is empty. Pass an (inputs, targets) batch or an iterable of them.")
    _, world = D.rank_and_world(group)
    if count < world:
        raise InputDataError(f"{count} batch(es) for {world} ranks: each rank needs at least one; use smaller batches or fewer ranks")
    return mine, count


def first_forward(model: nn.Module, inputs: Any, where: str = "the first batch") -> Any:
    """The model's output on ``inputs`` (no gradients); its failure becomes an InputDataError naming the shape."""
    try:
        with torch.no_grad():
            return run_model(model, inputs)
    except HessqError:
        raise
    except Exception as exc:  # the model's own error: usually a shape or dtype mismatch
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputDataError(f"the model cannot run on {where}: inputs of shape {shape_of(inputs)} give "
                             f"{type(exc).__name__}: {first}. Pass inputs shaped as the model expects") from exc


def _check_data(model: nn.Module, mine: list[tuple[int, Any]], loss_fn: LossFn | None) -> None:
    """One forward of the first batch; with the default loss, targets must be class indices the output has."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    index, (inputs, _) = mine[0]
    out = first_forward(model, move_to(inputs, device), f"batch {index}")
    if loss_fn is not None:
        return  # a custom loss decides what its targets are
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise InputDataError(f"the default loss (cross-entropy) needs (batch, classes) logits; the model returns "
                             f"{type(out).__name__}{f' of shape {tuple(out.shape)}' if isinstance(out, torch.Tensor) else ''}. "
                             "Pass loss_fn=")
    for b, (inputs, targets) in mine:
        check_class_targets(targets, int(out.shape[1]), where=f"batch {b}'s targets")
        if targets.dim() and int(targets.shape[0]) != batch_size(inputs):
            raise InputDataError(f"batch {b} has {batch_size(inputs)} inputs but {int(targets.shape[0])} targets")


def _select_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    layers = _check_names(layers)
    found = quantizable_layers(model)
    if layers is not None:
        unknown = [n for n in layers if n not in found]
        if unknown:
            raise ConfigError(f"no quantizable layer named {unknown}; the model has {list(found)}")
        frozen = [n for n in layers if not found[n].weight.requires_grad]
        if frozen:
            raise ConfigError(f"layers {frozen} have requires_grad=False; enable it (weight.requires_grad_(True)) or leave them out of layers=")
        found = {n: found[n] for n in found if n in set(layers)}
    chosen = {n: m for n, m in found.items() if m.weight.requires_grad}
    if not chosen:
        raise ConfigError(
            f"no quantizable layer with gradients: all {len(found)} Conv2d/Linear weights have requires_grad=False. "
            "Call model.requires_grad_(True) (or on the layers to analyse) before computing the Hessian."
        )
    return chosen


class _EvalMode:
    """Analyse in eval mode (BatchNorm running statistics, no dropout); restore the mode after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def _operator(model, batches, loss_fn, layers, group, cache, activations=False):
    _check_loss_fn(loss_fn)
    chosen = _select_layers(model, layers)
    mine, count = _local_batches(batches, group, model)
    _check_data(model, mine, loss_fn)
    op = HessianOperator(
        model, mine, loss_fn or F.cross_entropy, [m.weight for m in chosen.values()], list(chosen),
        act_layers=chosen if activations else None, group=group, cache=len(mine) == 1 if cache is None else cache,
    )
    return op, chosen, count


def hessian_sensitivity(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]] | tuple[Any, Any],
    loss_fn: LossFn | None = None,
    *,
    layers: Sequence[str] | None = None,
    method: str = "auto",
    rtol: float = 0.05,
    max_samples: int = 200,
    min_samples: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    eigenvalues: bool = True,
    top_k: int = 1,
    eig_max_iter: int = 100,
    eig_tol: float = 1e-4,
    qbert: bool = False,
    activations: bool = False,
    cache: bool | None = None,
    progress: bool = False,
    group=None,
) -> Sensitivity:
    """Per-layer Hessian sensitivity of every quantizable layer (HAWQ, HAWQ-V2/V3, Q-BERT).

    ``batches`` is one ``(inputs, targets)`` batch or an iterable of them; ``loss_fn(output,
    targets)`` returns the batch's mean loss (default cross-entropy). The Hessian is that of
    the size-weighted mean loss over all batches, in eval mode. Every layer's trace Tr(H_ll) comes
    to relative standard error ≤ ``rtol``, or exact, by the estimator its model allows (``method``):

    * ``"auto"``: layers the output is linear in (piecewise-linear nets: ReLU, ReLU6, max-pool,
      BN in eval mode, residual adds) get their Gauss-Newton block's trace, which equals the
      Hessian block's: exact (standard error 0) from one plain backward pass per output of the
      model (``"exact"``), or sampled when it has more than 32 outputs (``"ggn"``); every other
      layer gets Hutchinson on its own block (``"restricted"``), drawn until its standard error
      is at most ``rtol``·|trace|;
    * ``"exact"``/``"ggn"``: the Gauss-Newton route for every layer (a ConfigError names the layers
      it does not hold for); ``"restricted"``: per-layer Hutchinson for every layer;
      ``"hutchinson"``: one shared Rademacher vector per HVP read per layer (the former engine).

    Sampling stops at ``max_samples`` draws or after ``time_budget`` seconds; a UserWarning then
    names the layers short of ``rtol``. ``meta["converged"]`` says whether all reached it; each
    record's ``extra`` holds its ``estimator`` and ``samples``. With ``eigenvalues`` each layer's
    top eigenvalue (``top_k`` of them in ``extra["top_eigenvalues"]``) comes by power iteration on
    its block (``extra["eigen_converged"]``: relative change ≤ ``eig_tol`` before ``eig_max_iter``);
    ``qbert`` adds Q-BERT's |mean λ| + std λ over the batches; ``activations`` adds HAWQ-V2's
    trace with respect to each layer's input activation (shared-vector Hutchinson). Under
    torch.distributed the batches are split over the ranks (round robin) and the products summed;
    the result equals a single-process run on the same batches and seed. ``layers`` restricts the
    analysis to those layer names. ``min_samples`` defaults to 10, or ``max_samples`` when smaller.

    ``batches`` is read once, at the start, and kept in memory for every product: a generator
    or one-shot iterator is accepted (what it yields is what is analysed). Arguments, the model
    and every batch (an (inputs, targets) pair, inputs in the model's float dtype without NaN,
    targets class indices the model's output has) are checked before the first product.
    """
    model = capture(check_model(model))
    rtol, max_samples, min_samples = _sample_counts(rtol, max_samples, min_samples)
    top_k, eig_max_iter = check_int(top_k, "top_k", low=1), check_int(eig_max_iter, "eig_max_iter", low=1)
    eig_tol, seed = check_number(eig_tol, "eig_tol", low=0), check_int(seed, "seed", low=0)
    if method not in T.METHODS:
        raise ConfigError(f"method must be one of {list(T.METHODS)}, got {method!r}")
    if time_budget is not None:
        time_budget = check_number(time_budget, "time_budget", low=0, strict=True)
    rank, world = D.rank_and_world(group)
    show = progress and rank == 0
    with _EvalMode(model):
        op, chosen, count = _operator(model, batches, loss_fn, layers, group, cache, activations)
        budget = T.Budget(time_budget, group, op.device)
        names, modules = list(chosen), list(chosen.values())
        traces, stopped, passes, acts, act_numel, reason = _layer_traces(
            op, modules, names, method, rtol=rtol, max_samples=max_samples, min_samples=min_samples, seed=seed,
            budget=budget, activations=activations, show=show)
        trace_hvps = op.hvp_count
        extras: dict[str, dict[str, Any]] = {n: {"estimator": t.estimator, "samples": t.samples} for n, t in zip(names, traces)}
        tops: dict[str, float | None] = {n: None for n in names}
        eigen_ok = None
        if eigenvalues:
            eig = _block_eigenvalues(op, range(len(names)), top_k, eig_max_iter, eig_tol, seed, show)
            for n, (vals, iters, ok) in zip(names, eig):
                tops[n] = vals[0]
                extras[n].update(eigen_hvps=iters, eigen_converged=ok)
                if top_k > 1:
                    extras[n]["top_eigenvalues"] = vals
            eigen_ok = all(ok for _, _, ok in eig)
        if qbert:
            for n, (score, lams) in zip(names, _qbert(op, eig_max_iter, eig_tol, seed, count, show)):
                extras[n].update(qbert=score, qbert_eigenvalues=lams)
        for n in acts:
            extras[n].update(
                activation_trace=acts[n].trace, activation_trace_stderr=acts[n].stderr, activation_numel=int(round(act_numel[n]))
            )
    records = {
        n: LayerSensitivity(t.trace, t.stderr, tops[n], chosen[n].weight.numel(), extras[n]) for n, t in zip(names, traces)
    }
    short = [n for n, t in zip(names, traces) if not t.stderr <= rtol * abs(t.trace)]
    if short:
        rel = ", ".join(f"{n} {records[n].trace_stderr / max(abs(records[n].trace), 1e-300):.1%}" for n in short[:8])
        warnings.warn(
            f"hessian_sensitivity stopped at {stopped or 'max_samples'} before {len(short)} of {len(names)} layers "
            f"reached rtol={rtol:g} (relative standard error: {rel}{', ...' if len(short) > 8 else ''}); raise max_samples"
            f"{' or time_budget' if time_budget is not None else ''}, or loosen rtol", stacklevel=2)
    signature = model_signature(model)  # the whole model's, so check_model() accepts it with layers= too
    estimators = [t.estimator for t in traces]
    meta = {
        "method": method,
        "estimators": {e: estimators.count(e) for e in dict.fromkeys(estimators)},
        "samples": max(t.samples for t in traces),
        "converged": not short,
        "short_layers": short,
        "stopped_by": stopped if short else None,
        "rtol": rtol,
        "max_samples": max_samples,
        "time_budget": time_budget,
        "seed": seed,
        "num_batches": count,
        "num_data": int(op.num_data),
        "world_size": world,
        "trace_total": float(sum(t.trace for t in traces)),
        "trace_total_stderr": float(np.sqrt(sum(t.stderr**2 for t in traces))),
        "trace_hvps_per_rank": trace_hvps,
        "backward_passes_per_rank": passes,
        "eigenvalues": eigenvalues,
        "eigen_converged": eigen_ok,
        "top_k": top_k if eigenvalues else 0,
        "activations": activations,
        "qbert": qbert,
    }
    if reason is not None:
        meta["ggn_unavailable"] = reason
    return Sensitivity(records, signature, meta)


def _layer_traces(op: HessianOperator, modules, names, method, *, rtol, max_samples, min_samples, seed, budget, activations, show):
    """Each layer's trace by its estimator: (traces, what stopped sampling, GGN backward passes, activation traces)."""
    kw = dict(rtol=rtol, max_samples=max_samples, min_samples=min_samples, seed=seed, progress=show)
    acts, act_numel, reason, passes, stops = {}, {}, None, 0, []
    if method == "hutchinson" or activations:  # one shared vector per HVP; HAWQ-V2's activation blocks ride along
        per, _, acts, act_numel = hutchinson(op, activations=activations, **kw, deadline=budget)
        traces = [T.LayerTrace(p.trace, p.stderr, p.samples, "hutchinson") for p in per]
        if method == "hutchinson":
            stop = None if all(p.stderr <= rtol * abs(p.trace) for p in per) else ("time_budget" if budget.expired() else "max_samples")
            return traces, stop, 0, acts, act_numel, None
    eligible, outputs, first = [False] * len(names), T.MAX_OUTPUTS + 1, None
    if method != "restricted":
        eligible, reason, outputs, first = T.ggn_eligible(op, modules, op.group)
    plan = T.choose(method, eligible, names, reason, outputs)
    traces: list[T.LayerTrace | None] = [None] * len(names)
    ggn = [i for i, e in enumerate(plan) if e.startswith("ggn")]
    if ggn:
        got, stop, passes = T.ggn_traces(op, modules, ggn, exact=plan[ggn[0]] == "ggn-exact", budget=budget, first=first, **kw)
        stops.append(stop)
        for i, t in zip(ggn, got):
            traces[i] = t
    del first  # the first batch's forward graph
    rest = [i for i, e in enumerate(plan) if e == "restricted"]
    if rest:
        got, stop = T.restricted_traces(op, rest, budget=budget, **kw)
        stops.append(stop)
        for i, t in zip(rest, got):
            traces[i] = t
    return traces, next((s for s in stops if s), None), passes, acts, act_numel, reason


def _block_eigenvalues(op: HessianOperator, indices, k, max_iter, tol, seed, show) -> list[tuple[list[float], int, bool]]:
    """(top k eigenvalues, HVPs used, converged within ``tol``) per layer."""
    out = []
    for i in tqdm(list(indices), desc="Top eigenvalues", unit="layer", disable=not show, leave=False):
        gen = sub_generator(seed, 0xE16E, i)
        out.append(power_iteration(lambda v, i=i: op.block_hvp(i, v), op.params[i].numel(), k=k, max_iter=max_iter, tol=tol,
                                   generator=gen, device=op.device, report=True))
    return out


def _qbert(op: HessianOperator, max_iter, tol, seed, count, show) -> list[tuple[float, list[float]]]:
    """Q-BERT: each layer's top eigenvalue on every batch separately, then |mean| + std over batches."""
    table = torch.zeros(count, len(op.params), dtype=torch.float64, device=op.device)
    for b, batch in tqdm(op.batches, desc="Q-BERT eigenvalues", unit="batch", disable=not show, leave=False):
        sub = HessianOperator(op.model, [(b, batch)], op.loss_fn, op.params, op.names, group=D.LOCAL, cache=True)
        for i in range(len(op.params)):
            gen = sub_generator(seed, 0x0BE7, b, i)
            vals, _ = power_iteration(lambda v, i=i: sub.block_hvp(i, v), op.params[i].numel(), max_iter=max_iter, tol=tol, generator=gen, device=op.device)
            table[b, i] = vals[0]
    lam = D.all_reduce_sum(table, op.group).cpu().numpy()
    return [(float(abs(lam[:, i].mean()) + lam[:, i].std()), lam[:, i].tolist()) for i in range(lam.shape[1])]


def hessian_trace(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]] | tuple[Any, Any],
    loss_fn: LossFn | None = None,
    *,
    params: Sequence[torch.Tensor] | None = None,
    rtol: float = 0.01,
    max_samples: int = 200,
    min_samples: int | None = None,
    seed: int = 0,
    cache: bool | None = None,
    progress: bool = False,
    group=None,
) -> TraceEstimate:
    """Hutchinson estimate of Tr(H) over ``params`` (default: every parameter with requires_grad).

    The whole-model trace PyHessian's ``trace()`` computes, with its standard error. Arguments and
    ``batches`` are checked, and ``batches`` read once, as in :func:`hessian_sensitivity`.
    """
    model = capture(check_model(model))
    rtol, max_samples, min_samples = _sample_counts(rtol, max_samples, min_samples)
    seed = check_int(seed, "seed", low=0)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise ConfigTypeError(f"params must be a list of parameter tensors, got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ConfigError("no parameter with requires_grad=True: nothing to differentiate. Call model.requires_grad_(True).")
    if not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ConfigError("params must be tensors with requires_grad=True (e.g. [m.weight for m in layers])")
    _check_loss_fn(loss_fn)
    with _EvalMode(model):
        mine, _ = _local_batches(batches, group, model)
        _check_data(model, mine, loss_fn)
        op = HessianOperator(model, mine, loss_fn or F.cross_entropy, params, [f"param{i}" for i in range(len(params))],
                             group=group, cache=len(mine) == 1 if cache is None else cache)
        _, total, _, _ = hutchinson(op, rtol=rtol, max_samples=max_samples, min_samples=min_samples, seed=seed,
                                    stop_on_total=True, progress=progress and D.rank_and_world(group)[0] == 0)
    return total


def top_eigenvalues(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]] | tuple[Any, Any],
    loss_fn: LossFn | None = None,
    *,
    layers: Sequence[str] | None = None,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    cache: bool | None = None,
    progress: bool = False,
    group=None,
) -> dict[str, list[float]]:
    """Each quantizable layer's top ``k`` Hessian-block eigenvalues by power iteration (HAWQ).

    Arguments and ``batches`` are checked, and ``batches`` read once, as in :func:`hessian_sensitivity`.
    """
    model = capture(check_model(model))
    k, max_iter = check_int(k, "k", low=1), check_int(max_iter, "max_iter", low=1)
    tol, seed = check_number(tol, "tol", low=0), check_int(seed, "seed", low=0)
    with _EvalMode(model):
        op, chosen, _ = _operator(model, batches, loss_fn, layers, group, cache)
        eig = _block_eigenvalues(op, range(len(chosen)), k, max_iter, tol, seed, progress and D.rank_and_world(group)[0] == 0)
    return {n: vals for n, (vals, _, _) in zip(chosen, eig)}


def spectral_density(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]] | tuple[Any, Any],
    loss_fn: LossFn | None = None,
    *,
    layer: str | None = None,
    iters: int = 100,
    n_v: int = 1,
    seed: int = 0,
    cache: bool | None = None,
    group=None,
) -> SpectralDensity:
    """SLQ eigenvalue density (PyHessian's ``density``) of the Hessian over all quantizable
    layers' weights, or of one layer's block with ``layer=``. Arguments and ``batches`` are
    checked, and ``batches`` read once, as in :func:`hessian_sensitivity`."""
    model = capture(check_model(model))
    iters, n_v, seed = check_int(iters, "iters", low=1), check_int(n_v, "n_v", low=1), check_int(seed, "seed", low=0)
    if layer is not None and not isinstance(layer, str):
        raise ConfigTypeError(f"layer must be one layer's name (a string) or None, got {layer!r}")
    gen = torch.Generator().manual_seed(seed)
    with _EvalMode(model):
        op, chosen, _ = _operator(model, batches, loss_fn, [layer] if layer is not None else None, group, cache)
        if layer is not None:
            return slq(lambda v: op.block_hvp(0, v), op.params[0].numel(), iters=iters, n_v=n_v, generator=gen, device=op.device)
        sizes = [p.numel() for p in op.params]
        return slq(lambda v: torch.cat(op.full_hvp(list(v.split(sizes)))), sum(sizes), iters=iters, n_v=n_v, generator=gen, device=op.device)
