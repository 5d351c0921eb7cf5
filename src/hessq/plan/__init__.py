"""Bit allocation: cost model, perturbation Ω, HAWQ-V3's ILP, the size–Ω Pareto frontier, and BitPlan."""

from hessq.plan._bitplan import BitPlan
from hessq.plan._cost import LatencyTable, LayerCost, layer_costs, perturbations
from hessq.plan._ilp import InfeasibleLimitsError
from hessq.plan._pareto import ParetoFrontier, ParetoPoint, pareto_frontier
from hessq.plan._plan import Relative, evaluate_plan, plan_bits
from hessq.plan._ties import graph_facts

__all__ = [
    "BitPlan",
    "InfeasibleLimitsError",
    "LatencyTable",
    "LayerCost",
    "ParetoFrontier",
    "ParetoPoint",
    "Relative",
    "evaluate_plan",
    "graph_facts",
    "layer_costs",
    "pareto_frontier",
    "perturbations",
    "plan_bits",
]
