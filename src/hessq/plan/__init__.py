"""Bit allocation: cost model, perturbation Ω, HAWQ-V3's ILP, the size–Ω Pareto frontier, and BitPlan.

``check_bits_list``, ``parse_limit`` and ``as_latency_table`` let a caller check weight bits, limits and
a latency table (file or mapping) before any expensive stage runs, with the planner's own errors.
"""

from hessq.plan._bitplan import BitPlan
from hessq.plan._cost import (
    CURVATURES,
    Curvature,
    LatencyTable,
    LayerCost,
    as_latency_table,
    check_bits_list,
    check_curvature,
    layer_costs,
    perturbations,
)
from hessq.plan._ilp import InfeasibleLimitsError
from hessq.plan._pareto import ParetoFrontier, ParetoPoint, pareto_frontier
from hessq.plan._plan import Relative, evaluate_plan, parse_limit, plan_bits
from hessq.plan._rows import lookup_counts, tiers_of
from hessq.plan._ties import graph_facts

__all__ = [
    "CURVATURES",
    "BitPlan",
    "Curvature",
    "InfeasibleLimitsError",
    "LatencyTable",
    "LayerCost",
    "ParetoFrontier",
    "ParetoPoint",
    "Relative",
    "as_latency_table",
    "check_bits_list",
    "check_curvature",
    "evaluate_plan",
    "graph_facts",
    "layer_costs",
    "lookup_counts",
    "parse_limit",
    "pareto_frontier",
    "perturbations",
    "plan_bits",
    "tiers_of",
]
