"""The public entry points: per-layer Hessian sensitivity, whole-model trace, eigenvalues, density."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hessq._errors import ConfigError
from hessq.graph import quantizable_layers
from hessq.sensitivity import _distributed as D
from hessq.sensitivity._density import SpectralDensity, slq
from hessq.sensitivity._eigen import power_iteration
from hessq.sensitivity._hutchinson import TraceEstimate, hutchinson
from hessq.sensitivity._hvp import HessianOperator, sub_generator
from hessq.sensitivity._result import LayerSensitivity, Sensitivity, model_signature

LossFn = Callable[[Any, Any], torch.Tensor]


def _is_batch(obj: Any) -> bool:
    return isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], (torch.Tensor, dict))


def _local_batches(batches: Any, group) -> tuple[list[tuple[int, Any]], int]:
    """This rank's (global index, batch) pairs (round robin), and the number of batches in all."""
    if _is_batch(batches):
        batches = [batches]
    mine, count = [], 0
    for b, batch in enumerate(batches):
        count += 1
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ConfigError(f"batch {b} is a {type(batch).__name__}; each batch must be an (inputs, targets) pair")
        if D.owns(b, group):
            mine.append((b, tuple(batch)))
    if count == 0:
        raise ConfigError("no data: `batches` is empty. Pass an (inputs, targets) batch or an iterable of them.")
    _, world = D.rank_and_world(group)
    if count < world:
        raise ConfigError(f"{count} batch(es) for {world} ranks: each rank needs at least one; use smaller batches or fewer ranks")
    return mine, count


def _select_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
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
    chosen = _select_layers(model, layers)
    mine, count = _local_batches(batches, group)
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
    rtol: float = 0.05,
    max_samples: int = 200,
    min_samples: int = 10,
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
    the size-weighted mean loss over all batches, in eval mode. Traces come from Hutchinson
    samples shared by all layers (one HVP per sample and batch), drawn until every layer's
    standard error is at most ``rtol``·|trace| or ``max_samples``. With ``eigenvalues`` each
    layer's top eigenvalue (``top_k`` of them in ``extra["top_eigenvalues"]``) comes by power
    iteration on its block; ``qbert`` adds Q-BERT's |mean λ| + std λ over the batches;
    ``activations`` adds HAWQ-V2's trace with respect to each layer's input activation. Under
    torch.distributed the batches are split over the ranks (round robin) and the products
    summed; the result equals a single-process run on the same batches and seed.
    ``layers`` restricts the analysis to those layer names.
    """
    rank, world = D.rank_and_world(group)
    show = progress and rank == 0
    with _EvalMode(model):
        op, chosen, count = _operator(model, batches, loss_fn, layers, group, cache, activations)
        names = list(chosen)
        per, total, acts, act_numel = hutchinson(
            op, rtol=rtol, max_samples=max_samples, min_samples=min_samples, seed=seed, activations=activations, progress=show
        )
        trace_hvps = op.hvp_count
        extras: dict[str, dict[str, Any]] = {n: {} for n in names}
        tops: dict[str, float | None] = {n: None for n in names}
        if eigenvalues:
            eig = _block_eigenvalues(op, range(len(names)), top_k, eig_max_iter, eig_tol, seed, show)
            for n, (vals, iters) in zip(names, eig):
                tops[n] = vals[0]
                extras[n]["eigen_hvps"] = iters
                if top_k > 1:
                    extras[n]["top_eigenvalues"] = vals
        if qbert:
            for n, (score, lams) in zip(names, _qbert(op, eig_max_iter, eig_tol, seed, count, show)):
                extras[n].update(qbert=score, qbert_eigenvalues=lams)
        for n in acts:
            extras[n].update(
                activation_trace=acts[n].trace, activation_trace_stderr=acts[n].stderr, activation_numel=int(round(act_numel[n]))
            )
    records = {
        n: LayerSensitivity(per[i].trace, per[i].stderr, tops[n], chosen[n].weight.numel(), extras[n]) for i, n in enumerate(names)
    }
    signature = model_signature(model)  # the whole model's, so check_model() accepts it with layers= too
    meta = {
        "method": "hutchinson",
        "samples": total.samples,
        "converged": bool(all(p.stderr <= rtol * abs(p.trace) for p in per)),
        "rtol": rtol,
        "max_samples": max_samples,
        "seed": seed,
        "num_batches": count,
        "num_data": int(op.num_data),
        "world_size": world,
        "trace_total": total.trace,
        "trace_total_stderr": total.stderr,
        "trace_hvps_per_rank": trace_hvps,
        "eigenvalues": eigenvalues,
        "top_k": top_k if eigenvalues else 0,
        "activations": activations,
        "qbert": qbert,
    }
    return Sensitivity(records, signature, meta)


def _block_eigenvalues(op: HessianOperator, indices, k, max_iter, tol, seed, show) -> list[tuple[list[float], int]]:
    out = []
    for i in tqdm(list(indices), desc="Top eigenvalues", unit="layer", disable=not show, leave=False):
        gen = sub_generator(seed, 0xE16E, i)
        out.append(power_iteration(lambda v, i=i: op.block_hvp(i, v), op.params[i].numel(), k=k, max_iter=max_iter, tol=tol, generator=gen, device=op.device))
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
    min_samples: int = 10,
    seed: int = 0,
    cache: bool | None = None,
    progress: bool = False,
    group=None,
) -> TraceEstimate:
    """Hutchinson estimate of Tr(H) over ``params`` (default: every parameter with requires_grad).

    The whole-model trace PyHessian's ``trace()`` computes, with its standard error.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ConfigError("no parameter with requires_grad=True: nothing to differentiate. Call model.requires_grad_(True).")
    with _EvalMode(model):
        mine, _ = _local_batches(batches, group)
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
    """Each quantizable layer's top ``k`` Hessian-block eigenvalues by power iteration (HAWQ)."""
    with _EvalMode(model):
        op, chosen, _ = _operator(model, batches, loss_fn, layers, group, cache)
        eig = _block_eigenvalues(op, range(len(chosen)), k, max_iter, tol, seed, progress and D.rank_and_world(group)[0] == 0)
    return {n: vals for n, (vals, _) in zip(chosen, eig)}


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
    layers' weights, or of one layer's block with ``layer=``."""
    gen = torch.Generator().manual_seed(seed)
    with _EvalMode(model):
        op, chosen, _ = _operator(model, batches, loss_fn, [layer] if layer is not None else None, group, cache)
        if layer is not None:
            return slq(lambda v: op.block_hvp(0, v), op.params[0].numel(), iters=iters, n_v=n_v, generator=gen, device=op.device)
        sizes = [p.numel() for p in op.params]
        return slq(lambda v: torch.cat(op.full_hvp(list(v.split(sizes)))), sum(sizes), iters=iters, n_v=n_v, generator=gen, device=op.device)
