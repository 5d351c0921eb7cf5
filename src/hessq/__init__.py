"""hessq: Hessian-aware mixed-precision quantization and integer-only inference for PyTorch models."""

__version__ = "0.1.0"

from hessq._errors import (
    ArtifactError,
    CheckpointMismatchError,
    ConfigError,
    ConfigTypeError,
    HessqError,
    HessqRuntimeError,
    InputDataError,
    MissingDependencyError,
    ModelError,
)
from hessq import data, models
from hessq.pipeline import CompressResult, FinetuneConfig, compress
from hessq.data import accuracy
from hessq.distill import DistilledData, distill_data
from hessq.graph import quantizable_layers
from hessq.integer import IntegerModel, export_onnx, load_integer, to_integer
from hessq.plan import BitPlan, InfeasibleLimitsError, LatencyTable, ParetoFrontier, Relative, pareto_frontier, plan_bits
from hessq.fakequant import calibrate, finetune, quantize
from hessq.sensitivity import (
    LayerSensitivity,
    Sensitivity,
    SpectralDensity,
    TraceEstimate,
    hessian_sensitivity,
    hessian_trace,
    kl_sensitivity,
    spectral_density,
    top_eigenvalues,
)
