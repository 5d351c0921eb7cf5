"""hessq: Hessian-aware mixed-precision quantization and integer-only inference for PyTorch models."""

__version__ = "0.1.0"

from hessq import data, models
from hessq.graph import quantizable_layers
from hessq.sensitivity import LayerSensitivity, Sensitivity
from hessq.data import accuracy
from hessq.quantize import calibrate, finetune, quantize
from hessq.plan import BitPlan, InfeasibleLimitsError, LatencyTable, ParetoFrontier, Relative, pareto_frontier, plan_bits
from hessq.distill import DistilledData, distill_data
from hessq.sensitivity import kl_sensitivity
from hessq.sensitivity import SpectralDensity, TraceEstimate, hessian_sensitivity, hessian_trace, spectral_density, top_eigenvalues
