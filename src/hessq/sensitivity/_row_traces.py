"""The Hessian trace of groups of an embedding table's rows, measured rather than shared out by lookups.

A lookup copies one row, so row r's block of the Hessian collects the curvature of every position that holds
token r. Splitting a table's trace among its rows by lookups (hessq.plan's row tiers) takes that curvature as
equal at every position. Here each group G of rows gets its own Hutchinson estimate on its own block,

    Tr(H_GG) = E[v_Gᵀ H v_G],   v_G Rademacher on the rows of G, zero elsewhere,

one restricted Hessian-vector product per group and draw (no cross terms with other groups or layers), drawn
until each group's standard error is at most ``rtol`` of its trace.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hessq._checks import check_int, check_model, check_number
from hessq._errors import ConfigError, ConfigTypeError
from hessq.graph import capture
from hessq.sensitivity import _distributed as D
from hessq.sensitivity import _traces as T
from hessq.sensitivity._engine import LossFn, _EvalMode, _operator, _sample_counts
from hessq.sensitivity._hvp import rademacher, sub_generator


@dataclass(frozen=True)
class RowTrace:
    """The trace of one group of a table's rows: its rows, Tr(H) over them, the standard error and the draws."""

    rows: torch.Tensor
    trace: float
    stderr: float
    samples: int


def _groups(model: nn.Module, row_groups: Any) -> dict[str, list[torch.Tensor]]:
    if not isinstance(row_groups, Mapping) or not row_groups:
        raise ConfigTypeError("row_groups must map embedding table names to lists of row-index tensors, got "
                              f"{type(row_groups).__name__}{' (empty)' if isinstance(row_groups, Mapping) else ''}")
    out = {}
    for name, groups in row_groups.items():
        table = dict(model.named_modules()).get(name)
        if not isinstance(table, nn.Embedding):
            raise ConfigError(f"row_groups names {name!r}, which is not an nn.Embedding of the model")
        if isinstance(groups, torch.Tensor) or not isinstance(groups, Iterable):
            raise ConfigTypeError(f"row_groups[{name!r}] must be a list of row-index tensors (one per group)")
        rows = [torch.as_tensor(g).long().reshape(-1) for g in groups]
        if not rows or any(r.numel() == 0 for r in rows):
            raise ConfigError(f"row_groups[{name!r}] needs at least one group, and every group at least one row")
        every = torch.cat(rows)
        if bool((every < 0).any()) or bool((every >= table.num_embeddings).any()):
            raise ConfigError(f"row_groups[{name!r}] holds row indices outside 0..{table.num_embeddings - 1}")
        if every.unique().numel() != every.numel():
            raise ConfigError(f"row_groups[{name!r}]: a row belongs to more than one group (or twice to one)")
        out[str(name)] = rows
    return out


def hessian_row_traces(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]] | tuple[Any, Any],
    row_groups: Mapping[str, Sequence[torch.Tensor]],
    loss_fn: LossFn | None = None,
    *,
    rtol: float = 0.05,
    max_samples: int = 200,
    min_samples: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    progress: bool = False,
    group=None,
) -> dict[str, list[RowTrace]]:
    """Tr(H) over each group of rows of each embedding table in ``row_groups`` (table -> [row indices, ...]),
    each by Hutchinson on the group's own block, drawn until its standard error is at most ``rtol``·|trace| (or
    ``max_samples`` draws, or ``time_budget`` seconds: a UserWarning then names the groups short of it).

    The groups of :func:`hessq.plan.row_tiers` give :func:`hessq.plan_bits` (``row_traces=``) each tier's measured
    trace instead of the table's trace shared by lookups. ``batches``, ``loss_fn`` and ``group`` are as for
    :func:`hessq.hessian_sensitivity`; under torch.distributed the result equals a single process's.
    """
    model = capture(check_model(model))
    rtol, max_samples, min_samples = _sample_counts(rtol, max_samples, min_samples)
    seed = check_int(seed, "seed", low=0)
    if time_budget is not None:
        time_budget = check_number(time_budget, "time_budget", low=0, strict=True)
    groups = _groups(model, row_groups)
    show = progress and D.rank_and_world(group)[0] == 0
    with _EvalMode(model):
        op, chosen, _ = _operator(model, batches, loss_fn, list(groups), group, cache=None)
        index = {name: i for i, name in enumerate(chosen)}
        units = [(name, rows) for name in groups for rows in groups[name]]

        def draw(d: int, active: list[int]) -> torch.Tensor:
            vectors = []
            for u in active:
                name, rows = units[u]
                p = op.params[index[name]]
                v = torch.zeros_like(p)
                v[rows.to(p.device)] = rademacher((rows.numel(), *p.shape[1:]), sub_generator(seed, 0x2035, u, d), p)
                vectors.append(v)
            return op.block_dots([index[units[u][0]] for u in active], vectors)

        budget = T.Budget(time_budget, group, op.device)
        draws, stopped = T.sample(draw, len(units), rtol=rtol, max_samples=max_samples, min_samples=min_samples,
                                  budget=budget, per_layer=True, desc="Hessian traces (row groups)", progress=show)
    out: dict[str, list[RowTrace]] = {name: [] for name in groups}
    short = []
    for (name, rows), values in zip(units, draws):
        trace, stderr = T.mean_stderr(values)
        out[name].append(RowTrace(rows, trace, stderr, len(values)))
        if not stderr <= rtol * abs(trace):
            short.append(f"{name}[group {len(out[name]) - 1}]")
    if short:
        warnings.warn(f"{len(short)} row group(s) short of rtol={rtol:g} ({stopped}): {short[:8]}. Raise "
                      "max_samples or time_budget for tighter traces", stacklevel=2)
    return out
