"""Row tiers: an embedding table's rows split by how often they are looked up, each tier a unit of the ILP.

A lookup copies one row, so row r's Hessian block collects the curvature of every position that holds token r:
its trace grows with the row's lookups, and a row never looked up has none. The table's Tr(H) is split among its
rows in proportion to their lookups on the user's data (the per-position curvature taken as equal), and the rows,
sorted by lookups, form tiers that each hold half of the lookups left: 1/2, 1/4, 1/8, ..., the last tier the
rest (every row never looked up among them). Each tier is planned like a layer,

    Ω_k(b) = Tr(H) · (lookups in tier k / all lookups) / n_k · ‖Q_b(W_k) − W_k‖²,

so the ILP can keep the few thousand rows of a corpus's frequent tokens wide and send the 30,000 others to
2 bits. On the BBC MiniLM at an average of 3 weight bits, the 2,000 most frequent rows at 4 bits instead of 2 are
worth a point of accuracy for 0.19 MB (bench/qbert_probes.py word-rows). Given ``row_traces``
(:func:`hessq.sensitivity.hessian_row_traces` on these tiers), a tier's Tr(H) is measured instead:
Ω_k(b) = Tr(H_kk) / n_k · ‖Q_b(W_k) − W_k‖².
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from hessq._checks import check_model
from hessq._errors import ConfigError, ConfigTypeError
from hessq._utils import batch_inputs, model_device, move_to, training_mode
from hessq.graph import capture, quantizable_layers
from hessq.ops import family_of_module
from hessq.plan._bitplan import BitPlan
from hessq.plan._cost import NEGATIVE_FLOOR, LayerCost, curvature_bound

#: The default number of tiers per table.
ROW_TIERS = 4


class _AllLookedUp(Exception):
    """Every table has been read for this batch: the rest of the forward pass is not needed."""


def lookup_counts(model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """How often each row of each embedding table is looked up on ``batches`` (table name -> int64 [rows]).

    Padding ids (the table's ``padding_idx``) are not counted. Each forward pass stops once every table has been
    read, so for BERT only the embeddings run.
    """
    model = capture(check_model(model))
    tables = {n: m for n, m in quantizable_layers(model).items() if isinstance(m, nn.Embedding)}
    if not tables:
        raise ConfigError(f"{type(model).__name__} has no nn.Embedding: there are no rows to count")
    counts = {n: torch.zeros(m.num_embeddings, dtype=torch.long) for n, m in tables.items()}
    seen: set[str] = set()

    def counter(name: str, table: nn.Embedding):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            ids = args[0].reshape(-1).long().cpu()
            if table.padding_idx is not None:
                ids = ids[ids != table.padding_idx % table.num_embeddings]
            counts[name] += torch.bincount(ids, minlength=table.num_embeddings)
            seen.add(name)
            if len(seen) == len(tables):
                raise _AllLookedUp
        return pre_hook

    hooks = [m.register_forward_pre_hook(counter(n, m)) for n, m in tables.items()]
    device = model_device(model)
    try:
        with torch.no_grad(), training_mode(model, False):
            for batch in batches:
                seen.clear()
                inputs = move_to(batch_inputs(batch), device)
                try:
                    model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
                except _AllLookedUp:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return counts


def tiers_of(counts: torch.Tensor, tiers: int = ROW_TIERS) -> list[torch.Tensor]:
    """The rows of each tier (most looked-up first): tier k < tiers − 1 ends where the lookups so far reach
    1 − 2^−(k+1) of all; the last holds the rest. Ties go by row index; empty tiers are dropped."""
    if isinstance(tiers, bool) or not isinstance(tiers, int) or tiers < 1:
        raise ConfigError(f"row tiers must be an integer of at least 1, got {tiers!r}")
    counts = torch.as_tensor(counts).long()
    if counts.dim() != 1 or bool((counts < 0).any()):
        raise ConfigError("lookup counts must be a vector of non-negative counts, one per table row")
    order = torch.from_numpy(np.lexsort((np.arange(len(counts)), -counts.numpy())))
    total = int(counts.sum())
    if total == 0:
        return [order]
    cumulative = counts[order].cumsum(0)
    ends = [int(torch.searchsorted(cumulative, total * (1 - 0.5 ** (k + 1)))) + 1 for k in range(tiers - 1)]
    bounds = [0] + sorted(set(min(e, len(order)) for e in ends)) + [len(order)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def tier_name(table: str, k: int) -> str:
    return f"{table}[rows {k}]"


def measured_tier_traces(name: str, tiers: list[torch.Tensor], measured: Any, margin: float,
                         floor_per_row: float, curvature: str = "signed") -> list[float]:
    """Each tier's Tr(H) from :func:`hessq.sensitivity.hessian_row_traces` on exactly these tiers (with
    ``margin`` standard errors added, from its magnitude under ``curvature="magnitude"``); a non-positive one becomes
    ``floor_per_row`` per row, as a layer's does."""
    if isinstance(measured, (str, bytes)) or not isinstance(measured, Iterable):
        raise ConfigTypeError(f"row_traces[{name!r}] must be the list hessian_row_traces gives for the table")
    measured = list(measured)
    same = len(measured) == len(tiers) and all(
        all(hasattr(m, a) for a in ("rows", "trace", "stderr")) and torch.equal(torch.as_tensor(m.rows).long().sort().values, t.sort().values)
        for m, t in zip(measured, tiers))
    if not same:
        raise ConfigError(f"row_traces[{name!r}] was measured on other row groups than the table's {len(tiers)} "
                          "tiers: measure it on hessq.plan.tiers_of(row_usage[table], row_tiers)")
    out = []
    for m, rows in zip(measured, tiers):
        trace = curvature_bound(m.trace, m.stderr, margin, curvature)
        if not math.isfinite(trace):
            raise ConfigError(f"row_traces[{name!r}] holds a trace that is not finite ({m.trace}); measure it again")
        out.append(trace if trace > 0 else floor_per_row * rows.numel())
    return out


def split_tables(problem, model: nn.Module, factors: Mapping[str, float], usage: Mapping[str, Any], tiers: int,
                 row_traces: Mapping[str, Any] | None = None, margin: float = 0.0, curvature: str = "signed"):
    """``problem`` with each table in ``usage`` replaced by its tiers; returns (problem, {table: rows per tier}).

    A table in ``row_traces`` takes its tiers' measured traces; the others share the table's trace by lookups."""
    if not isinstance(usage, Mapping):
        raise ConfigTypeError(f"row_usage must map table names to lookup counts, got {type(usage).__name__}")
    row_traces = {} if row_traces is None else row_traces
    if not isinstance(row_traces, Mapping):
        raise ConfigTypeError(f"row_traces must map table names to hessian_row_traces lists, got {type(row_traces).__name__}")
    extra = [n for n in row_traces if n not in usage]
    if extra:
        raise ConfigError(f"row_traces names tables {extra} that row_usage does not; pass their lookups too")
    layers = quantizable_layers(capture(model))
    split: dict[str, list[torch.Tensor]] = {}
    for name, counts in usage.items():
        m = layers.get(name)
        if not isinstance(m, nn.Embedding):
            raise ConfigError(f"row_usage names {name!r}, which is not an embedding table of the model")
        counts = torch.as_tensor(counts)
        if counts.shape != (m.num_embeddings,):
            raise ConfigError(f"row_usage[{name!r}] has shape {tuple(counts.shape)}; the table has {m.num_embeddings} rows")
        group = next(g for g in problem.groups if name in g)
        if name in problem.pins or len(group) > 1:
            continue  # pinned or tied tables keep one width
        split[name] = tiers_of(counts, tiers)
    if not split:
        return problem, split
    names, groups, omega, allowed = [], [], [], []
    costs = {k: [] for k in problem.layer_costs}
    all_costs = dict(problem.costs)
    for i, name in enumerate(problem.names):
        if name not in split:
            names.append(name)
            omega.append(problem.layer_omega[i])
            for k in costs:
                costs[k].append(problem.layer_costs[k][i])
            continue
        w = layers[name].weight.detach()
        counts = torch.as_tensor(usage[name]).double()
        trace = factors[name] * w.numel()  # Tr(H) (with its margin), shared by lookups
        if name in row_traces:
            floor = NEGATIVE_FLOOR * max([abs(f) for f in factors.values()] + [1e-30]) * w.shape[1]
            tier_traces = measured_tier_traces(name, split[name], row_traces[name], margin, floor, curvature)
        else:
            total = counts.sum()
            tier_traces = [trace * (float(counts[rows].sum() / total) if total > 0 else 1.0) for rows in split[name]]
        quantizer = family_of_module(layers[name]).weight_quantizer
        for k, rows in enumerate(split[name]):
            tier = tier_name(name, k)
            n = rows.numel() * w.shape[1]
            names.append(tier)
            omega.append(np.array([tier_traces[k] / n * quantizer(b).squared_error(w[rows]) for b in problem.bits]))
            all_costs[tier] = LayerCost(tier, problem.costs[name].kind, n, rows.numel(), False, 0)
            costs["size"].append(np.array([all_costs[tier].size_bytes(b) for b in problem.bits], dtype=np.float64))
            costs["bops"].append(np.zeros(len(problem.bits)))
            if "latency" in costs:  # a lookup's time, shared by rows (it hardly depends on the width)
                costs["latency"].append(problem.layer_costs["latency"][i] * rows.numel() / w.shape[0])
    for g_index, g in enumerate(problem.groups):
        if g[0] in split:
            groups += [[tier_name(g[0], k)] for k in range(len(split[g[0]]))]
            allowed += [problem.allowed[g_index]] * len(split[g[0]])
        else:
            groups.append(g)
            allowed.append(problem.allowed[g_index])
    return replace(problem, names=names, groups=groups, allowed=np.array(allowed), layer_omega=np.array(omega),
                   layer_costs={k: np.array(v) for k, v in costs.items()}, costs=all_costs), split


def fold_tiers(plan: BitPlan, split: Mapping[str, list[torch.Tensor]], names: Iterable[str]) -> BitPlan:
    """A plan over tiers as a plan over the model's layers: each table at its largest tier's width, with the
    rows of its other tiers in ``row_bits``, and the tiers' figures summed."""
    bits, layers, row_bits = {}, {}, {}
    for name in names:
        if name not in split:
            bits[name], layers[name] = plan[name], dict(plan.layers[name])
            continue
        tiers = [(tier_name(name, k), rows) for k, rows in enumerate(split[name])]
        base = plan[max(tiers, key=lambda t: t[1].numel())[0]]
        bits[name] = base
        others: dict[int, list[int]] = {}
        for tier, rows in tiers:
            if plan[tier] != base:
                others.setdefault(plan[tier], []).extend(rows.tolist())
        row_bits[name] = {b: sorted(r) for b, r in sorted(others.items())}
        figures = [plan.layers[t] for t, _ in tiers]
        layers[name] = {key: (None if any(f.get(key) is None for f in figures) else sum(f[key] for f in figures))
                        for key in ("num_params", "macs", "size_bytes", "bops", "latency", "omega")}
        layers[name]["row_tiers"] = [{"rows": rows.numel(), "bits": plan[t]} for t, rows in tiers]
    meta = dict(plan.meta)
    meta["row_tiers"] = {n: len(t) for n, t in split.items()}
    return BitPlan(bits, plan.act_bits, layers=layers, limits=plan.limits, signature=plan.signature, meta=meta,
                   row_bits=row_bits)
