"""HAWQ-V3's integer program: one bit width per layer group, minimum Ω under size/BOPs/latency limits.

minimise Σ_g Σ_k Ω_gk x_gk  s.t.  Σ_k x_gk = 1 for every group g,  Σ_gk cost^j_gk x_gk ≤ limit_j,
x binary; solved exactly by scipy.optimize.milp (HiGHS). Disallowed choices carry Ω = inf.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import LinearConstraint, milp

from hessq._errors import ConfigError, HessqRuntimeError

#: The limits the planner knows, in the order they are reported, with their units.
LIMIT_NAMES = ("size", "bops", "latency")
UNITS = {"size": "bytes", "bops": "BOPs", "latency": "s"}

# A limit counts as met if exceeded by no more than this relative amount (float round-off).
_RTOL = 1e-9
_PRESOLVE = True
# The objective is scaled so its largest coefficient is this: HiGHS stops at an absolute gap of
# 1e-6 (not settable through scipy), which is then ~1e-8 of a typical optimum rather than ~1e-5.
_OBJECTIVE_SCALE = 1e3


def fmt(limit: str, value: float) -> str:
    if limit == "latency":
        return f"{value:.6g} s"
    if abs(value) >= 1000 or float(value).is_integer():
        return f"{value:,.0f} {UNITS[limit]}"
    return f"{value:.6g} {UNITS[limit]}"


_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 (HiGHS's presolve prints debug lines there, e.g.
    "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();")."""
    with _STDOUT_LOCK:
        try:
            sys.stdout.flush()
        except Exception:
            pass
        try:
            saved = os.dup(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            yield
            return
        try:
            os.dup2(devnull, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)


class InfeasibleLimitsError(ConfigError):
    """No bit plan meets the limits.

    ``minimum`` holds, for each limit given, the smallest value any plan reaches (that limit on
    its own); ``minimum_with_others`` the smallest value reachable while meeting the other given
    limits (None where those others are already infeasible together).
    """

    def __init__(self, message: str, minimum: Mapping[str, float], minimum_with_others: Mapping[str, float | None]):
        super().__init__(message)
        self.minimum = dict(minimum)
        self.minimum_with_others = dict(minimum_with_others)


@dataclass
class Solution:
    choice: np.ndarray  # chosen column per group
    objective: float
    status: str
    mip_gap: float | None = None  # HiGHS's final relative gap (0 when proven optimal to the last digit)


def _allowed(omega: np.ndarray) -> np.ndarray:
    return np.isfinite(omega)


def reachable_range(cost: np.ndarray, allowed: np.ndarray) -> tuple[float, float]:
    """(smallest, largest) total of ``cost`` over plans that pick one allowed column per row."""
    lo = np.where(allowed, cost, np.inf).min(axis=1).sum()
    hi = np.where(allowed, cost, -np.inf).max(axis=1).sum()
    return float(lo), float(hi)


def _met(total: float, limit: float) -> bool:
    return total <= limit + _RTOL * max(abs(limit), abs(total), 1e-300)


def solve(
    omega: np.ndarray,
    costs: Mapping[str, np.ndarray],
    limits: Mapping[str, float],
    *,
    time_limit: float | None = None,
) -> Solution:
    """Solve the multiple-choice ILP. ``omega`` and every cost are (groups, choices) arrays.

    Raises :class:`InfeasibleLimitsError` naming the smallest reachable value of each limit.
    """
    omega = np.asarray(omega, dtype=np.float64)
    G, K = omega.shape
    allowed = _allowed(omega)
    if not allowed.any(axis=1).all():
        raise ConfigError("a layer group has no allowed bit width")
    for name in limits:
        if name not in costs:
            raise ConfigError(f"a {name} limit needs a {name} cost for every layer")
    active = {k: float(v) for k, v in limits.items() if v is not None}
    for name, v in active.items():
        if not np.isfinite(v):
            raise ConfigError(f"{name}_limit must be a finite number, got {v}")

    # Cheap check first: each limit on its own.
    minimum = {k: reachable_range(np.asarray(costs[k], dtype=np.float64), allowed)[0] for k in active}
    if any(not _met(minimum[k], active[k]) for k in active):
        raise _infeasible(omega, costs, active, minimum, time_limit)

    sol = _milp(omega, costs, active, allowed, time_limit)
    if sol is None:
        raise _infeasible(omega, costs, active, minimum, time_limit)
    return sol


def _milp(
    objective: np.ndarray,
    costs: Mapping[str, np.ndarray],
    limits: Mapping[str, float],
    allowed: np.ndarray,
    time_limit: float | None,
) -> Solution | None:
    G, K = objective.shape
    rows, cols = np.nonzero(allowed)  # row-major: group by group
    nvar = rows.size
    obj = objective[rows, cols]
    # Shift each group's objective by its minimum and scale to O(1): the optimum is unchanged,
    # and HiGHS's absolute tolerances then mean the same thing for every model.
    gmin = np.full(G, np.inf)
    np.minimum.at(gmin, rows, obj)
    c = obj - gmin[rows]
    scale = c.max() if c.size and c.max() > 0 else 1.0
    c = c / scale * _OBJECTIVE_SCALE

    a_eq = sparse.csr_array((np.ones(nvar), (rows, np.arange(nvar))), shape=(G, nvar))
    constraints = [LinearConstraint(a_eq, 1.0, 1.0)]
    if limits:
        lim_rows, ub = [], []
        for name, limit in limits.items():
            cost = np.asarray(costs[name], dtype=np.float64)[rows, cols]
            cmin = np.full(G, np.inf)
            np.minimum.at(cmin, rows, cost)
            coef = cost - cmin[rows]  # ≥ 0
            rhs = limit - cmin.sum()
            s = max(abs(rhs), coef.max(initial=0.0), 1e-300)
            lim_rows.append(coef / s)
            ub.append(rhs / s + _RTOL)
        constraints.append(LinearConstraint(np.vstack(lim_rows), -np.inf, np.asarray(ub)))
    options = {"presolve": _PRESOLVE, "mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    with _quiet_stdout():
        res = milp(c, integrality=np.ones(nvar), bounds=(0, 1), constraints=constraints, options=options)
    if res.x is None:
        if res.status == 2:
            return None
        raise HessqRuntimeError(f"the ILP solver stopped without a plan: {res.message}")
    x = res.x > 0.5
    choice = np.full(G, -1)
    choice[rows[x]] = cols[x]
    if (choice < 0).any() or np.bincount(rows[x], minlength=G).max() != 1:
        raise HessqRuntimeError(f"the ILP solver returned an invalid assignment ({res.message})")
    for name, limit in limits.items():
        total = float(np.asarray(costs[name], dtype=np.float64)[np.arange(G), choice].sum())
        if not _met(total, limit + 1e-7 * max(abs(limit), 1.0)):
            raise HessqRuntimeError(f"the ILP solver's plan exceeds the {name} limit ({total} > {limit})")
    status = "optimal" if res.status == 0 else f"stopped early: {res.message}"
    gap = getattr(res, "mip_gap", None)
    return Solution(choice, float(objective[np.arange(G), choice].sum()), status,
                    None if gap is None else float(gap))


def _infeasible(
    omega: np.ndarray,
    costs: Mapping[str, np.ndarray],
    limits: Mapping[str, float],
    minimum: Mapping[str, float],
    time_limit: float | None,
) -> InfeasibleLimitsError:
    allowed = _allowed(omega)
    with_others: dict[str, float | None] = {}
    for name in limits:
        others = {k: v for k, v in limits.items() if k != name}
        if not others:
            with_others[name] = minimum[name]
            continue
        if any(not _met(minimum[k], v) for k, v in others.items()):
            with_others[name] = None
            continue
        cost = np.where(allowed, np.asarray(costs[name], dtype=np.float64), np.inf)
        sol = _milp(cost, costs, others, allowed, time_limit)
        with_others[name] = None if sol is None else sol.objective
    parts = []
    for name, limit in limits.items():
        text = f"{name}_limit={fmt(name, limit)}: smallest reachable {fmt(name, minimum[name])}"
        w = with_others[name]
        if len(limits) > 1:
            if w is None:
                text += " (the other limit(s) cannot be met at all)"
            else:
                text += f", {fmt(name, w)} while meeting the other limits"
        parts.append(text)
    message = (
        "no bit plan meets the limits — " + "; ".join(parts) + ". Raise a limit, add lower bit widths to weight_bits, "
        "or unpin layers."
    )
    return InfeasibleLimitsError(message, minimum, with_others)
