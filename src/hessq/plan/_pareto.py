"""The size–Ω Pareto frontier (ZeroQ / HAWQ-V2): the ILP solved over a sweep of size limits."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import nn

from hessq._errors import ConfigError
from hessq.plan._bitplan import BitPlan
from hessq.plan._files import SealedJSONFile, mapping_or_empty, real_number, required
from hessq.plan._cost import STDERR_MARGIN, Curvature, LatencyTable, Variant
from hessq.plan._ilp import InfeasibleLimitsError
from hessq.plan._plan import Limit, build_problem, tiered_problem
from hessq.plan._rows import ROW_TIERS
from hessq.sensitivity import Sensitivity

FORMAT = "hessq.pareto"
#: 2: sealed (sha256). Version-1 files had no checksum and are refused.
VERSION = 2


@dataclass
class ParetoPoint:
    """One point of the frontier: the plan of least Ω whose size is at most ``size_limit``."""

    size_limit: float
    size_bytes: float
    omega: float
    plan: BitPlan

    def to_dict(self) -> dict[str, Any]:
        return {"size_limit": self.size_limit, "size_bytes": self.size_bytes, "omega": self.omega,
                "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "a Pareto point") -> "ParetoPoint":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
        numbers = [real_number(required(d, k, where), f"{where} {k}") for k in ("size_limit", "size_bytes", "omega")]
        try:
            plan = BitPlan.from_dict(required(d, "plan", where))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return cls(*numbers, plan)


class ParetoFrontier(SealedJSONFile, Sequence[ParetoPoint]):
    """Points of strictly falling Ω as size grows, each with its plan, sorted by size; saved as sealed JSON."""

    FORMAT = FORMAT
    VERSION = VERSION
    WHAT = "Pareto frontier"
    REMEDY = "compute it again with hessq.pareto_frontier (or `hessq compress`)"

    def __init__(self, points: Iterable[ParetoPoint], meta: Mapping[str, Any] | None = None) -> None:
        self.points = list(points)
        self.meta = dict(meta or {})

    @overload
    def __getitem__(self, i: int) -> ParetoPoint: ...
    @overload
    def __getitem__(self, i: slice) -> list[ParetoPoint]: ...
    def __getitem__(self, i):
        return self.points[i]

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self) -> Iterator[ParetoPoint]:
        return iter(self.points)

    def __repr__(self) -> str:
        if not self.points:
            return "ParetoFrontier(empty)"
        return (f"ParetoFrontier({len(self)} points, size {self.points[0].size_bytes:,.0f}–"
                f"{self.points[-1].size_bytes:,.0f} B, Ω {self.points[0].omega:.4g}–{self.points[-1].omega:.4g})")

    def best_under(self, size_bytes: float) -> ParetoPoint:
        """The point of least Ω with size at most ``size_bytes``."""
        if not self.points:
            raise ConfigError("the Pareto frontier has no points")
        fits = [p for p in self.points if p.size_bytes <= size_bytes]
        if not fits:
            raise ConfigError(f"no frontier point is at most {size_bytes:,.0f} bytes (smallest {self.points[0].size_bytes:,.0f})")
        return min(fits, key=lambda p: p.omega)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "meta": self.meta, "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ParetoFrontier":
        """A frontier from :meth:`to_dict`'s form; wrong kind, version or structure is a ConfigError."""
        data = cls.check_kind(data)
        points = required(data, "points", "the Pareto frontier")
        if not isinstance(points, (list, tuple)):
            raise ConfigError(f"the Pareto frontier's 'points' must be a list, got {type(points).__name__}")
        return cls([ParetoPoint.from_dict(p, f"Pareto point {i}") for i, p in enumerate(points)],
                   mapping_or_empty(data.get("meta"), "the Pareto frontier's meta"))


def pareto_frontier(
    model: nn.Module,
    sens: Sensitivity,
    *,
    weight_bits: Iterable[int] | int = (2, 3, 4, 5, 6, 7, 8),
    num_points: int = 100,
    act_bits: int = 8,
    bops_limit: Limit = None,
    latency_limit: Limit = None,
    latency_table: LatencyTable | Mapping | str | os.PathLike | None = None,
    ties: Iterable[Iterable[str]] = (),
    auto_ties: bool = True,
    pins: Mapping[str, int] | None = None,
    pin_first_last: int | None = 8,
    variant: Variant = "trace",
    example_input: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    stderr_margin: float = STDERR_MARGIN,
    row_usage: Mapping[str, torch.Tensor] | None = None,
    row_tiers: int = ROW_TIERS,
    row_traces: Mapping[str, Sequence[Any]] | None = None,
    curvature: Curvature = "signed",
) -> ParetoFrontier:
    """The size–Ω frontier: the ILP at ``num_points`` size limits evenly spaced from the smallest to the
    largest reachable size (other limits held), keeping each distinct non-dominated plan.

    The same arguments as :func:`plan_bits` (``row_usage``, ``row_traces``: embedding tables in row tiers, each point's plan
    folded back with its ``row_bits``); Ω and the costs are computed once for all points.
    """
    if not isinstance(num_points, int) or isinstance(num_points, bool) or num_points < 2:
        raise ConfigError(f"num_points must be an integer ≥ 2, got {num_points!r}")
    problem = build_problem(
        model, sens, weight_bits=weight_bits, act_bits=act_bits, latency_table=latency_table, ties=ties,
        auto_ties=auto_ties, pins=pins, pin_first_last=pin_first_last, variant=variant,
        example_input=example_input, input_shape=input_shape, stderr_margin=stderr_margin, curvature=curvature,
    )
    problem, fold = tiered_problem(problem, model, sens, row_usage, row_tiers, variant=variant,
                                   stderr_margin=stderr_margin, row_traces=row_traces, curvature=curvature)
    others = problem.resolve_limits(None, bops_limit, latency_limit)
    lo, hi = problem.reachable("size")
    t0 = time.perf_counter()
    found: dict[tuple, ParetoPoint] = {}
    infeasible = 0
    for i in range(num_points):
        limit = lo + (hi - lo) * i / (num_points - 1)
        try:
            plan = fold(problem.solve({"size": limit, **others}, meta={"size_limit": limit}))
        except InfeasibleLimitsError:
            infeasible += 1
            continue
        key = (tuple(plan.values()), repr(plan.row_bits))
        if key not in found:
            found[key] = ParetoPoint(limit, float(plan.size_bytes), float(plan.omega), plan)
    if not found:
        raise InfeasibleLimitsError(
            "no point of the frontier meets the other limits (bops/latency) at any size", {}, {}
        )
    pts = sorted(found.values(), key=lambda p: (p.size_bytes, p.omega))
    frontier: list[ParetoPoint] = []
    for p in pts:
        if not frontier or p.omega < frontier[-1].omega:
            frontier.append(p)
    meta = {
        "num_limits": num_points,
        "size_range": [lo, hi],
        "other_limits": others,
        "infeasible_limits": infeasible,
        "seconds": time.perf_counter() - t0,
        "weight_bits": list(problem.weight_bits),
    }
    return ParetoFrontier(frontier, meta)
