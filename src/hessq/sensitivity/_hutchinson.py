"""Hutchinson's trace estimator for every layer at once, stopped by its standard error.

Tr(H_ii) = E[vᵢᵀ(Hv)ᵢ] for Rademacher v over all analysed parameters: one HVP gives
every layer's sample (the off-diagonal blocks H_ij, j≠i, add variance but no bias,
since E[vᵢvⱼᵀ] = 0). Samples are drawn until every layer's standard error is at most
``rtol`` times its |trace| (after ``min_samples``), or ``max_samples`` is reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from hessq._errors import ConfigError
from hessq.sensitivity._hvp import HessianOperator, rademacher, sub_generator


@dataclass
class TraceEstimate:
    """A Hutchinson estimate: the mean of ``samples`` draws and its standard error."""

    trace: float
    stderr: float
    samples: int
    values: list[float] = field(default_factory=list, repr=False)


def _mean_stderr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = x.mean(axis=0)
    se = x.std(axis=0, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else np.full_like(m, np.inf)
    return m, se


def hutchinson(
    op: HessianOperator,
    *,
    rtol: float,
    max_samples: int,
    min_samples: int,
    seed: int,
    activations: bool = False,
    stop_on_total: bool = False,
    progress: bool = False,
    deadline=None,
) -> tuple[list[TraceEstimate], TraceEstimate, dict[str, TraceEstimate], dict[str, float]]:
    """Per-parameter traces, the total over the parameters, and per-layer activation traces.

    With ``stop_on_total`` the stopping rule looks at the total's standard error only; ``deadline``
    (an object with ``expired()``) stops it early.
    """
    if max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}")
    gen = torch.Generator().manual_seed(seed)
    rows: list[np.ndarray] = []
    act_rows: list[dict[str, float]] = []
    act_numel: dict[str, float] = {}

    def act_vector(batch_index: int, layer: str, a: torch.Tensor) -> torch.Tensor:
        # Drawn from (seed, sample, batch, layer): the same whichever rank holds the batch.
        g = sub_generator(seed, len(rows), batch_index, list(op.act_layers).index(layer))
        return rademacher(a.shape, g, a)

    bar = tqdm(total=max_samples, desc="Hessian trace", unit="HVP", disable=not progress, leave=False)
    try:
        while len(rows) < max_samples:
            v = [rademacher(p.shape, gen, p) for p in op.params]
            dots, act = op.products(v, act_vector if activations else None)
            rows.append(dots.numpy())
            act_rows.append({n: d for n, (d, _) in act.items()})
            act_numel = {n: c for n, (_, c) in act.items()}
            bar.update(1)
            if len(rows) >= max(min_samples, 2):
                x = np.stack(rows)
                m, se = _mean_stderr(x.sum(axis=1, keepdims=True) if stop_on_total else x)
                rel = float(np.max(se / np.maximum(np.abs(m), 1e-30)))
                bar.set_postfix(rel_stderr=f"{rel:.3g}", target=rtol)
                if np.all(se <= rtol * np.abs(m)):
                    break
            if deadline is not None and deadline.expired():
                break
    finally:
        bar.close()
    x = np.stack(rows)
    m, se = _mean_stderr(x)
    per = [TraceEstimate(float(m[i]), float(se[i]), len(x)) for i in range(x.shape[1])]
    tot = x.sum(axis=1)
    tm, tse = _mean_stderr(tot[:, None])
    total = TraceEstimate(float(tm[0]), float(tse[0]), len(x), tot.tolist())
    acts = {}
    for n in act_numel:
        a = np.array([[r[n]] for r in act_rows])
        am, ase = _mean_stderr(a)
        acts[n] = TraceEstimate(float(am[0]), float(ase[0]), len(a))
    return per, total, acts, act_numel
