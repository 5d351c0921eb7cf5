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
from hessq.pipeline import (
    CompressResult,
    DistillConfig,
    ExportConfig,
    FinetuneConfig,
    PlanConfig,
    QuantizeConfig,
    SensitivityConfig,
    compress,
)
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
    hessian_row_traces,
    hessian_sensitivity,
    hessian_trace,
    kl_sensitivity,
    spectral_density,
    top_eigenvalues,
)

# The public API. Sub-packages (hessq.data, hessq.plan, hessq.fakequant, hessq.pipeline, ...) are
# modules of their own: no name below is also the name of a sub-package.
__all__ = [
    "__version__",
    # errors
    "ArtifactError", "CheckpointMismatchError", "ConfigError", "ConfigTypeError", "HessqError", "HessqRuntimeError",
    "InfeasibleLimitsError", "InputDataError", "MissingDependencyError", "ModelError",
    # the whole pipeline and its configs
    "compress", "CompressResult", "SensitivityConfig", "PlanConfig", "QuantizeConfig", "DistillConfig",
    "FinetuneConfig", "ExportConfig",
    # stages
    "distill_data", "DistilledData",
    "hessian_sensitivity", "hessian_row_traces", "hessian_trace", "kl_sensitivity", "spectral_density", "top_eigenvalues",
    "Sensitivity", "LayerSensitivity", "SpectralDensity", "TraceEstimate",
    "plan_bits", "pareto_frontier", "BitPlan", "LatencyTable", "ParetoFrontier", "Relative",
    "quantize", "calibrate", "finetune", "quantizable_layers",
    "to_integer", "load_integer", "export_onnx", "IntegerModel",
    "accuracy",
    # data sets and bundled models
    "data", "models",
]
