"""plan_bits: set up the ILP from a model, its sensitivity and the limits, and return a BitPlan."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from hessq._checks import check_model
from hessq._errors import ConfigError, ConfigTypeError, ModelError
from hessq.graph import capture, quantizable_layers
from hessq.plan._bitplan import BitPlan
from hessq.plan._cost import (
    LatencyTable,
    activation_matmul_macs,
    LayerCost,
    STDERR_MARGIN,
    Curvature,
    Variant,
    as_latency_table,
    check_act,
    check_bits_list,
    check_curvature,
    check_sensitivity,
    check_stderr_margin,
    layer_costs,
    perturbation_factors,
    perturbations,
)
from hessq.plan._ilp import LIMIT_NAMES, reachable_range, solve
from hessq.plan._rows import ROW_TIERS, fold_tiers, split_tables
from hessq.plan._ties import check_names, graph_facts, merge_ties
from hessq.quantizer import check_weight_bits
from hessq.sensitivity import Sensitivity, model_signature
from hessq.sensitivity import is_kl_sensitivity, kl_omega


class Relative:
    """A limit given as a fraction f in (0, 1] of the way from the all-lowest to the all-highest setting.

    ``size_limit=Relative(0.5)`` is HAWQ-V3's "50%" point: lo + 0.5·(hi − lo), where lo and hi are the
    smallest and largest reachable totals (pinned layers at their pins). ``"50%"`` means the same.
    """

    def __init__(self, fraction: float) -> None:
        f = float(fraction)
        if not (0.0 < f <= 1.0):
            raise ConfigError(f"a relative limit must be a fraction in (0, 1], got {fraction!r}")
        self.fraction = f

    def __repr__(self) -> str:
        return f"Relative({self.fraction})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Relative) and other.fraction == self.fraction

    def resolve(self, lo: float, hi: float) -> float:
        return lo + self.fraction * (hi - lo)


Limit = Union[float, int, Relative, str, None]


def parse_limit(value: Limit, name: str = "limit") -> float | Relative | None:
    """A number (absolute), a :class:`Relative`, or a string: ``"50%"`` (relative) or ``"1.5e6"`` (absolute)."""
    if value is None or isinstance(value, Relative):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, a Relative fraction or 'NN%', got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text[:-1] if text.endswith("%") else text)
        except ValueError:
            raise ConfigError(f"{name} must be a number or a percentage like '50%', got {value!r}") from None
        if text.endswith("%"):
            if not (0.0 < number <= 100.0):
                raise ConfigError(f"{name} {value!r} must be a percentage in (0%, 100%]: the share of the way from "
                                  "the all-lowest to the all-highest setting")
            return Relative(number / 100.0)
        value = number
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, a Relative fraction or 'NN%', got {value!r}") from None
    if not np.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if v < 0:
        raise ConfigError(f"{name} must not be negative, got {value!r}: give bytes, BOPs or seconds, or a "
                          "percentage like '50%'")
    return v


@dataclass
class Problem:
    """Everything the ILP needs, computed once: groups of tied layers, candidate bits, Ω and costs."""

    names: list[str]
    groups: list[list[str]]
    bits: tuple[int, ...]  # candidate columns (weight_bits ∪ pinned bits)
    allowed: np.ndarray  # (groups, columns) bool
    layer_omega: np.ndarray  # (layers, columns), nan where not computed
    layer_costs: dict[str, np.ndarray]  # limit -> (layers, columns)
    costs: dict[str, LayerCost]
    act_bits: int
    pins: dict[str, int]
    ties: list[list[str]]
    signature: dict[str, list[int]]
    variant: str
    weight_bits: tuple[int, ...]
    latency_table: LatencyTable | None = None
    #: Costs no bit choice changes, per limit: the BOPs of matmuls between two activations (attention).
    fixed: dict[str, float] = field(default_factory=dict)
    #: Standard errors added to each trace in Ω (None: Ω not from traces).
    stderr_margin: float | None = None
    #: How a curvature's sign entered Ω ("signed" or "magnitude"; None: Ω not from a Hessian).
    curvature: str | None = None

    def group_matrix(self, per_layer: np.ndarray) -> np.ndarray:
        index = {n: i for i, n in enumerate(self.names)}
        out = np.stack([per_layer[[index[n] for n in g]].sum(axis=0) for g in self.groups])
        return out

    @property
    def omega(self) -> np.ndarray:
        om = self.group_matrix(np.nan_to_num(self.layer_omega, nan=0.0))
        return np.where(self.allowed, om, np.inf)

    def group_costs(self) -> dict[str, np.ndarray]:
        return {k: self.group_matrix(np.nan_to_num(v, nan=0.0)) for k, v in self.layer_costs.items()}

    def reachable(self, limit: str) -> tuple[float, float]:
        if limit not in self.layer_costs:
            raise ConfigError(f"a {limit} limit needs a latency_table" if limit == "latency" else f"no {limit} costs")
        return reachable_range(self.group_costs()[limit], self.allowed)

    def resolve_limits(self, size: Limit = None, bops: Limit = None, latency: Limit = None) -> dict[str, float]:
        out = {}
        for name, value in zip(LIMIT_NAMES, (size, bops, latency)):
            v = parse_limit(value, f"{name}_limit")
            if v is None:
                continue
            if name == "latency" and "latency" not in self.layer_costs:
                raise ConfigError("latency_limit needs a latency_table (layer -> bits -> seconds)")
            if isinstance(v, Relative):
                v = v.resolve(*(r + self.fixed.get(name, 0.0) for r in self.reachable(name)))
            out[name] = float(v)
        return out

    def solve(self, limits: Mapping[str, float], time_limit: float | None = None, meta: Mapping[str, Any] | None = None) -> BitPlan:
        t0 = time.perf_counter()
        # the layers share what the fixed costs leave of each limit
        variable = {k: v - self.fixed.get(k, 0.0) for k, v in limits.items()}
        sol = solve(self.omega, self.group_costs(), variable, time_limit=time_limit)
        elapsed = time.perf_counter() - t0
        bits = {}
        for g, col in zip(self.groups, sol.choice):
            for n in g:
                bits[n] = self.bits[col]
        m = {"solver": "scipy.optimize.milp (HiGHS)", "status": sol.status, "mip_gap": sol.mip_gap,
             "solve_seconds": elapsed}
        m.update(meta or {})
        return self.plan(bits, limits=limits, meta=m)

    def _latency(self, i: int, name: str, bits: int, col: int) -> float | None:
        if "latency" not in self.layer_costs:
            return None
        v = self.layer_costs["latency"][i, col]
        if np.isnan(v):
            return self.latency_table.seconds(name, bits)  # raises, naming what is missing
        return float(v)

    def plan(self, bits: Mapping[str, int], limits: Mapping[str, float] | None = None, meta: Mapping[str, Any] | None = None) -> BitPlan:
        """The BitPlan (with all per-layer figures) of a given assignment."""
        layers = {}
        for i, n in enumerate(self.names):
            b = bits[n]
            col = self.bits.index(b)
            om = self.layer_omega[i, col]
            layers[n] = {
                "num_params": self.costs[n].num_params,
                "macs": self.costs[n].macs,
                "size_bytes": float(self.layer_costs["size"][i, col]),
                "bops": float(self.layer_costs["bops"][i, col]),
                "latency": self._latency(i, n, b, col),
                "omega": None if np.isnan(om) else float(om),
            }
        m = {
            **({"fixed_costs": dict(self.fixed)} if self.fixed else {}),
            "weight_bits": list(self.weight_bits),
            "variant": self.variant,
            **({"stderr_margin": self.stderr_margin} if self.stderr_margin is not None else {}),
            **({"curvature": self.curvature} if self.curvature not in (None, "signed") else {}),
            "pins": self.pins,
            "ties": [g for g in self.ties],
        }
        m.update(meta or {})
        return BitPlan({n: bits[n] for n in self.names}, self.act_bits, layers=layers, limits=limits,
                       signature=self.signature, meta=m)


def sensitivity_omega(model: nn.Module, sens: Sensitivity, bits: Iterable[int], *, variant: Variant = "trace",
                      stderr_margin: float = STDERR_MARGIN,
                      curvature: Curvature = "signed") -> dict[str, dict[int, float]]:
    """Ω per layer and bit width from a sensitivity: ZeroQ's KL table for a :func:`hessq.kl_sensitivity`
    result, else HAWQ's (Tr(H_i)/n_i or λ_i/n_i)·‖Q_b(W_i) − W_i‖²."""
    if is_kl_sensitivity(sens):
        check_sensitivity(model, sens)
        return kl_omega(sens)
    return perturbations(model, sens, bits, variant=variant, stderr_margin=stderr_margin, curvature=curvature)


def build_problem(
    model: nn.Module,
    sens: Sensitivity | None,
    *,
    weight_bits: Iterable[int] | int = (4, 8),
    act_bits: int = 8,
    latency_table: LatencyTable | Mapping | str | os.PathLike | None = None,
    ties: Iterable[Iterable[str]] = (),
    auto_ties: bool = True,
    pins: Mapping[str, int] | None = None,
    pin_first_last: int | None = 8,
    variant: Variant = "trace",
    example_input: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    omega: Mapping[str, Mapping[int, float]] | None = None,
    lenient: bool = False,
    stderr_margin: float = STDERR_MARGIN,
    curvature: Curvature = "signed",
) -> Problem:
    model = capture(check_model(model))
    layers = quantizable_layers(model)
    names = list(layers)
    if not names:
        raise ModelError(f"{type(model).__name__} has no Conv2d or Linear layer; there are no bits to plan")
    wbits = check_bits_list(weight_bits)
    act_bits = check_act(act_bits)

    # Pins: first and last by default, then the user's (which win).
    pin_map: dict[str, int] = {}
    if pin_first_last is not None:
        check_weight_bits(pin_first_last)
        pin_map[names[0]] = pin_first_last
        pin_map[names[-1]] = pin_first_last
    if pins:
        if not isinstance(pins, Mapping):
            raise ConfigTypeError(f"pins must map layer names to bit widths, got {type(pins).__name__}")
        check_names("pins", pins, names)
        for n, b in pins.items():
            check_weight_bits(b)
            pin_map[n] = b
    pin_map = {n: pin_map[n] for n in names if n in pin_map}

    # Ties: residual adds found by torch.fx, then the user's.
    user_ties = []
    for tie in ties:
        if isinstance(tie, str):
            raise ConfigTypeError(f"each tie must be a list of layer names, got the string {tie!r}")
        tie = list(tie)
        check_names("ties", tie, names)
        user_ties.append(tie)
    facts = graph_facts(model) if auto_ties else None
    found = facts.ties if facts is not None else []
    all_ties = found + user_ties
    groups = merge_ties(names, all_ties)

    # Candidate columns: weight_bits plus any pinned width.
    cols = tuple(sorted(set(wbits) | set(pin_map.values())))
    allowed = np.zeros((len(groups), len(cols)), dtype=bool)
    for gi, g in enumerate(groups):
        pinned = {pin_map[n] for n in g if n in pin_map}
        if len(pinned) > 1:
            raise ConfigError(
                f"tied layers {g} are pinned to different bit widths {sorted(pinned)}; tied layers share one width"
            )
        ok = pinned if pinned else set(wbits)
        allowed[gi] = [b in ok for b in cols]

    # Ω per layer and column.
    curvature = check_curvature(curvature)
    omega_from_hessian = omega is None and sens is not None and not is_kl_sensitivity(sens)
    if omega is None:
        if sens is None:
            raise ConfigError("give a sensitivity (or an omega table)")
        omega = sensitivity_omega(model, sens, cols, variant=variant, stderr_margin=stderr_margin,
                                  curvature=curvature)
    else:
        check_names("omega", omega, names)
        missing = [n for n in names if n not in omega]
        if missing:
            raise ConfigError(f"omega has no values for layers {missing[:5]}")
    layer_omega = np.full((len(names), len(cols)), np.nan)
    index = {n: i for i, n in enumerate(names)}
    for n in names:
        for j, b in enumerate(cols):
            if b in omega[n]:
                v = float(omega[n][b])
                if not np.isfinite(v):
                    raise ConfigError(f"Ω of layer {n!r} at {b} bits is not finite ({v})")
                layer_omega[index[n], j] = v
    gi_of = {n: gi for gi, g in enumerate(groups) for n in g}
    for n in names if not lenient else ():
        for j, b in enumerate(cols):
            if allowed[gi_of[n], j] and np.isnan(layer_omega[index[n], j]):
                raise ConfigError(f"omega has no value for layer {n!r} at {b} bits")

    # Costs.
    bias_layers = facts.bn_followed if facts is not None else graph_facts(model).bn_followed
    costs = layer_costs(model, example_input=example_input, input_shape=input_shape, bias_layers=bias_layers)
    matmul_macs = activation_matmul_macs(model, example_input=example_input, input_shape=input_shape)
    fixed = {"bops": float(matmul_macs * act_bits * act_bits)} if matmul_macs else {}
    lc = {
        "size": np.array([[costs[n].size_bytes(b) for b in cols] for n in names], dtype=np.float64),
        "bops": np.array([[costs[n].bops(b, act_bits) for b in cols] for n in names], dtype=np.float64),
    }
    table = as_latency_table(latency_table)
    if table is not None:
        check_names("latency_table", [n for n in table], names)
        lat = np.full((len(names), len(cols)), np.nan)
        for n in names:
            for j, b in enumerate(cols):
                if allowed[gi_of[n], j]:
                    if lenient:
                        lat[index[n], j] = table.get(n, {}).get(b, np.nan)
                    else:
                        lat[index[n], j] = table.seconds(n, b)
        lc["latency"] = lat

    return Problem(
        names=names,
        groups=groups,
        bits=cols,
        allowed=allowed,
        layer_omega=layer_omega,
        layer_costs=lc,
        costs=costs,
        act_bits=act_bits,
        pins=pin_map,
        ties=[list(t) for t in all_ties],
        signature=model_signature(model),
        variant=variant if sens is not None else "given",
        weight_bits=wbits,
        latency_table=table,
        fixed=fixed,
        stderr_margin=float(stderr_margin) if sens is not None and variant == "trace" and not is_kl_sensitivity(sens) else None,
        curvature=curvature if omega_from_hessian else None,
    )


def plan_bits(
    model: nn.Module,
    sens: Sensitivity,
    *,
    weight_bits: Iterable[int] | int = (4, 8),
    act_bits: int = 8,
    size_limit: Limit = None,
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
    time_limit: float | None = None,
    omega: Mapping[str, Mapping[int, float]] | None = None,
    stderr_margin: float = STDERR_MARGIN,
    row_usage: Mapping[str, torch.Tensor] | None = None,
    row_tiers: int = ROW_TIERS,
    row_traces: Mapping[str, Sequence[Any]] | None = None,
    curvature: Curvature = "signed",
) -> BitPlan:
    """Choose a weight bit width per layer minimising Σ Ω_i(b_i) under any of three limits (HAWQ-V3's ILP).

    Limits are absolute (bytes, BOPs, seconds) or relative — ``Relative(0.5)`` or ``"50%"`` — between
    the all-lowest and all-highest setting. ``weight_bits`` are the candidates (any of 2–8);
    ``act_bits`` is every layer's activation width (enters BOPs). Layers whose outputs meet at a
    residual add share bits (``auto_ties``), as do the groups in ``ties``; ``pins`` fixes layers'
    bits, and the first and last layer are pinned to ``pin_first_last`` bits unless it is None.
    ``variant="eigenvalue"`` uses λ_i/n_i instead of Tr(H_i)/n_i; with traces, each is taken ``stderr_margin``
    standard errors above its estimate (0: the estimate itself). ``curvature="magnitude"`` plans on |Tr(H_i)| (or
    |λ_i|), so that a layer of strongly negative curvature counts as sensitive rather than free (HAWQ's "signed",
    the default, gives it the fewest bits; see :data:`hessq.plan.Curvature`). MACs are counted on
    ``example_input`` or zeros of ``(1, *input_shape)`` (default (C, 28, 28)).
    A ZeroQ KL sensitivity (:func:`hessq.kl_sensitivity`) gives Ω_i(b) = KL directly; ``omega``
    (layer -> {bits: Ω}) overrides Ω from any source.

    ``row_usage`` (table name -> lookups of each row, from :func:`hessq.plan.lookup_counts` on the training
    data) splits those embedding tables into ``row_tiers`` tiers of rows by lookups, each planned like a layer
    with its share of the table's trace (:mod:`hessq.plan._rows`): the returned plan gives each such table the
    width of its largest tier and lists the rows of other widths in ``plan.row_bits``. Pinned or tied tables keep
    one width; a tier's latency is the table's, times its share of the rows. ``row_traces`` (table ->
    :func:`hessq.sensitivity.hessian_row_traces` on :func:`hessq.plan.tiers_of` of its lookups) gives tiers
    their measured traces instead of the table's trace shared by lookups.

    Raises :class:`InfeasibleLimitsError` (a ValueError) naming the smallest reachable value of
    each limit when no plan meets them. With no limit, every free layer gets its highest width.
    """
    problem = build_problem(
        model, sens, weight_bits=weight_bits, act_bits=act_bits, latency_table=latency_table, ties=ties,
        auto_ties=auto_ties, pins=pins, pin_first_last=pin_first_last, variant=variant,
        example_input=example_input, input_shape=input_shape, omega=omega, stderr_margin=stderr_margin,
        curvature=curvature,
    )
    problem, fold = tiered_problem(problem, model, sens, row_usage, row_tiers, omega=omega, variant=variant,
                                   stderr_margin=stderr_margin, row_traces=row_traces, curvature=curvature)
    limits = problem.resolve_limits(size_limit, bops_limit, latency_limit)
    return fold(problem.solve(limits, time_limit=time_limit))


def tiered_problem(problem: Problem, model: nn.Module, sens: Sensitivity, row_usage: Mapping[str, torch.Tensor] | None,
                   row_tiers: int, *, omega=None, variant: Variant = "trace", stderr_margin: float = STDERR_MARGIN,
                   row_traces: Mapping[str, Sequence[Any]] | None = None, curvature: Curvature = "signed"):
    """``problem`` with the tables of ``row_usage`` split into row tiers, and the function that folds a plan of it
    back into a plan of the model's layers (the identity when ``row_usage`` is empty)."""
    if not row_usage:
        if row_traces:
            raise ConfigError("row_traces needs row_usage: the tiers are made from each table's lookups")
        return problem, lambda plan: plan
    if omega is not None or is_kl_sensitivity(sens) or variant != "trace":
        raise ConfigError("row tiers split a table's Hessian trace by lookups: they need a Hessian trace "
                          "sensitivity (variant='trace'), not a given omega or a KL sensitivity")
    names = list(problem.names)
    captured = capture(model)
    with warnings.catch_warnings():  # build_problem has warned of non-positive traces already
        warnings.simplefilter("ignore")
        factors = perturbation_factors(captured, sens, quantizable_layers(captured), stderr_margin=stderr_margin,
                                       curvature=curvature)
    tiered, split = split_tables(problem, model, factors, row_usage, row_tiers, row_traces,
                                 check_stderr_margin(stderr_margin), curvature)
    return tiered, (lambda plan: fold_tiers(plan, split, names) if split else plan)


def evaluate_plan(
    model: nn.Module,
    bits: Mapping[str, int] | int,
    sens: Sensitivity | None = None,
    *,
    act_bits: int = 8,
    latency_table: LatencyTable | Mapping | str | os.PathLike | None = None,
    variant: Variant = "trace",
    example_input: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    stderr_margin: float = STDERR_MARGIN,
    curvature: Curvature = "signed",
) -> BitPlan:
    """The BitPlan of a given assignment (an int for a uniform one), with its size, BOPs, latency and Ω (if ``sens``)."""
    names = list(quantizable_layers(model))
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = {n: bits for n in names}
    check_names("bits", bits, names)
    missing = [n for n in names if n not in bits]
    if missing:
        raise ConfigError(f"bits has no width for layers {missing[:5]}")
    for b in bits.values():
        check_weight_bits(b)
    cols = sorted(set(bits.values()))
    if sens is not None:
        check_sensitivity(model, sens)
        omega = sensitivity_omega(model, sens, cols, variant=variant, stderr_margin=stderr_margin,
                                  curvature=curvature)
    else:
        omega = {n: {} for n in names}
    row_bits = dict(getattr(bits, "row_bits", None) or {})
    cols = sorted(set(cols) | {b for widths in row_bits.values() for b in widths})
    problem = build_problem(
        model, None, weight_bits=cols, act_bits=act_bits, latency_table=latency_table, auto_ties=False,
        pin_first_last=None, example_input=example_input, input_shape=input_shape, omega=omega, lenient=True,
    )
    plan = problem.plan(bits, meta={"made_by": "evaluate_plan"})
    if not row_bits:
        return plan
    # a table whose rows have widths of their own: its size by width; its Ω needs the lookups the planner split
    # its trace by (plan_bits(row_usage=...)), so it is left unknown here
    layers = {n: dict(d) for n, d in plan.layers.items()}
    for name, widths in row_bits.items():
        cost, rows = problem.costs[name], problem.signature[name][0]
        per_row = cost.num_params // rows
        counts = {b: len(r) for b, r in widths.items()}
        counts[bits[name]] = rows - sum(counts.values())
        layers[name]["size_bytes"] = float(sum(
            LayerCost(name, cost.kind, n * per_row, n, False, 0).size_bytes(b) for b, n in counts.items() if n))
        layers[name]["omega"] = None
    return BitPlan(dict(plan), plan.act_bits, layers=layers, signature=plan.signature, meta=plan.meta,
                   row_bits=row_bits)
