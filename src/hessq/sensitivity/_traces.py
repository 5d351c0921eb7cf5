"""Every layer's Hessian trace to a stated precision, by the cheapest estimator its model allows.

* ``ggn-exact``: the output is linear in the layer (piecewise-linear nets): Tr(H_ll) equals the
  Gauss-Newton block's trace, summed exactly over the output Hessian's eigen-directions
  (one plain backward pass per direction serves every such layer). Standard error 0.
* ``ggn``: the same, sampled: one backward per draw (for models with many outputs).
* ``restricted``: any other layer: Hutchinson with vectors on the layer's own block (no cross-
  block terms), each layer sampled until its own standard error is at most ``rtol``·|trace|;
  ``exact`` when that would take more draws than the layer has weights (one HVP per weight).
* ``hutchinson``: one shared vector over all layers per HVP (the former engine; cross-block
  terms add 5–100× variance), kept for comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hessq._errors import ConfigError
from hessq._utils import move_to
from hessq.sensitivity import _distributed as D
from hessq.sensitivity._ggn import GGNTraces, MAX_OUTPUTS, draw_generator, ggn_supported, separable_output
from hessq.sensitivity._hvp import HessianOperator, rademacher, sub_generator
from hessq.sensitivity._linearity import linear_in

METHODS = ("auto", "exact", "ggn", "restricted", "hutchinson")
#: With at most this many outputs per sample, ``auto`` sums the Gauss-Newton trace exactly.
EXACT_MAX_OUTPUTS = 32


@dataclass
class LayerTrace:
    """One layer's trace, its standard error (0 when exact), the draws it took and the estimator."""

    trace: float
    stderr: float
    samples: int
    estimator: str


class Budget:
    """Stops sampling once ``seconds`` have passed; every rank stops at the same draw."""

    def __init__(self, seconds: float | None, group=None, device: torch.device | str = "cpu") -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.group, self.device = group, device

    def expired(self) -> bool:
        if self.deadline is None:
            return False
        flag = torch.tensor([float(time.monotonic() > self.deadline)], dtype=torch.float64, device=self.device)
        return bool(D.all_reduce_sum(flag, self.group).item() > 0) if D.is_distributed(self.group) else bool(flag.item())


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("inf")


def sample(draw: Callable[[int, list[int]], torch.Tensor], count: int, *, rtol: float, max_samples: int, min_samples: int,
           budget: Budget, per_layer: bool, desc: str, progress: bool,
           switch: Callable[[int, int], bool] | None = None) -> tuple[list[list[float]], str | None]:
    """Draw until every one of ``count`` estimates has standard error ≤ rtol·|mean| (after ``min_samples``).

    ``draw(d, active)`` returns draw ``d`` of the active estimates. With ``per_layer`` a converged
    estimate stops being drawn; otherwise all are drawn until all have converged (one draw serves
    all). ``switch(i, draws_needed)`` may take estimate i out of sampling (to compute it otherwise)
    once its standard error predicts how many draws it needs in all. Returns the draws per estimate
    and what stopped it short (None, "max_samples", "time_budget").
    """
    rows: list[list[float]] = [[] for _ in range(count)]
    active = list(range(count))

    def done(i: int) -> bool:
        if len(rows[i]) < max(min_samples, 2):
            return False
        m, se = mean_stderr(rows[i])
        if se <= rtol * abs(m):
            return True
        need = len(rows[i]) * (se / (rtol * abs(m))) ** 2 if rtol * abs(m) > 0 else float("inf")
        return switch is not None and switch(i, need)

    bar = tqdm(total=max_samples, desc=desc, unit="draw", disable=not progress, leave=False)
    try:
        for d in range(max_samples):
            for i, v in zip(active, draw(d, active).tolist()):
                rows[i].append(v)
            bar.update(1)
            left = [i for i in active if not done(i)]
            active = left if per_layer else (active if left else [])
            if not active:
                return rows, None
            bar.set_postfix(layers_left=len(left))
            if budget.expired():
                return rows, "time_budget"
    finally:
        bar.close()
    return rows, "max_samples"


def ggn_eligible(op: HessianOperator, modules: Sequence[nn.Module], group=None) -> tuple[list[bool], str | None, int, tuple]:
    """Which layers the Gauss-Newton route applies to (the same answer on every rank), why not when for
    none, the model's outputs per sample, and the forward of the first batch it ran (output, each
    module's input and output) for the traces to reuse."""
    index, (inputs, targets) = op.batches[0]
    calls = [0] * len(modules)
    handles = [m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, m in enumerate(modules)]
    try:
        out, acts, outs = GGNTraces(op.model, modules, op.loss_fn, op.device, op._check_loss).forward(move_to(inputs, op.device))
    finally:
        for h in handles:
            h.remove()
    with torch.enable_grad():
        op._check_loss(op.loss_fn(out, move_to(targets, op.device)), index)
    reason, outputs = separable_output(out, move_to(targets, op.device), op.loss_fn), MAX_OUTPUTS + 1
    ok = [False] * len(modules)
    if reason is None:
        outputs = int(out[0].numel())
        lin = linear_in(out, op.params)
        ok = [lin[i] and ggn_supported(m) and calls[i] == 1 for i, m in enumerate(modules)]
    flags = D.all_reduce_sum(torch.tensor(ok, dtype=torch.float64, device=op.device), group)
    _, world = D.rank_and_world(group)
    return [bool(f == world) for f in flags.tolist()], reason, outputs, (index, out, acts, outs)


def ggn_traces(op: HessianOperator, modules: Sequence[nn.Module], indices: list[int], *, exact: bool, rtol: float,
               max_samples: int, min_samples: int, seed: int, budget: Budget, progress: bool,
               first: tuple | None = None) -> tuple[list[LayerTrace], str | None, int]:
    """Gauss-Newton traces of the layers ``indices``: exact, or sampled to ``rtol``. Also returns the backward
    passes. ``first`` is :func:`ggn_eligible`'s forward of the first batch, used instead of running it again."""
    ggn = GGNTraces(op.model, [modules[i] for i in indices], op.loss_fn, op.device, op._check_loss, cache=op.cache)
    if first is not None:
        index, out, acts, outs = first
        ggn.keep(index, out, [acts[i] for i in indices], [outs[i] for i in indices])

    def over_batches(directions) -> torch.Tensor:
        acc = torch.zeros(len(indices), dtype=torch.float64, device=op.device)
        for b, batch in op.batches:
            acc += ggn.batch(b, batch, lambda h, b=b: directions(h, b))
        return (D.all_reduce_sum(acc, op.group) / op.num_data).cpu()

    if exact:
        t = over_batches(lambda h, b: h.exact_directions())
        return [LayerTrace(float(v), 0.0, 0, "ggn-exact") for v in t.tolist()], None, ggn.backward_passes
    rows, stopped = sample(lambda d, active: over_batches(lambda h, b: h.sampled_directions(draw_generator(seed, d, b))),
                           len(indices), rtol=rtol, max_samples=max_samples, min_samples=min_samples, budget=budget,
                           per_layer=False, desc="Gauss-Newton traces", progress=progress)
    return [LayerTrace(*mean_stderr(r), len(r), "ggn") for r in rows], stopped, ggn.backward_passes


def restricted_traces(op: HessianOperator, indices: list[int], *, rtol: float, max_samples: int, min_samples: int, seed: int,
                      budget: Budget, progress: bool) -> tuple[list[LayerTrace], str | None]:
    """Hutchinson on each layer's own block, each layer drawn until its own standard error reaches ``rtol``.

    A layer whose standard error predicts more draws than it has weights (a small or near-zero
    block) switches to its exact trace, Σ_j e_jᵀH_ll e_j, one product per weight.
    """
    numel = [op.params[i].numel() for i in indices]
    exact: set[int] = set()

    def draw(d: int, active: list[int]) -> torch.Tensor:
        vs = [rademacher(op.params[indices[k]].shape, sub_generator(seed, 0x5E57, indices[k], d), op.params[indices[k]])
              for k in active]
        return op.block_dots([indices[k] for k in active], vs)

    def switch(k: int, need: float) -> bool:
        if numel[k] <= min(need, max_samples):
            exact.add(k)
        return k in exact

    rows, stopped = sample(draw, len(indices), rtol=rtol, max_samples=max_samples, min_samples=min_samples, budget=budget,
                           per_layer=True, desc="Hessian traces (per layer)", progress=progress, switch=switch)
    out = [LayerTrace(*mean_stderr(r), len(r), "restricted") for r in rows]
    for k in sorted(exact):
        out[k] = LayerTrace(op.block_trace(indices[k]), 0.0, numel[k], "exact")
    return out, stopped


def choose(method: str, eligible: list[bool], names: Sequence[str], reason: str | None, outputs: int) -> list[str]:
    """The estimator of each layer for ``method``; "exact" and "ggn" refuse layers they cannot serve."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method in ("hutchinson", "restricted"):
        return [method] * len(names)
    if method in ("exact", "ggn"):
        bad = [n for n, ok in zip(names, eligible) if not ok]
        if bad:
            why = reason or ("the model output is not linear in their weights (a smooth non-linearity such as "
                             "SiLU, GELU, tanh or softmax lies between them and the output, or the weight is used twice)")
            raise ConfigError(f"method={method!r} needs the Hessian block to equal the Gauss-Newton block, which does not "
                              f"hold for layers {bad[:8]}: {why}. Use method='auto' (those layers get restricted HVPs).")
        return ["ggn-exact" if method == "exact" else "ggn"] * len(names)
    ggn = "ggn-exact" if outputs <= EXACT_MAX_OUTPUTS else "ggn"
    return [ggn if ok else "restricted" for ok in eligible]
