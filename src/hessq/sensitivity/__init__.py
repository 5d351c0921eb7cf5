"""How much each layer minds low bits: Hessian traces and eigenvalues, KL sensitivity."""

from hessq.sensitivity._density import SpectralDensity
from hessq.sensitivity._engine import hessian_sensitivity, hessian_trace, spectral_density, top_eigenvalues
from hessq.sensitivity._hutchinson import TraceEstimate
from hessq.sensitivity._result import LayerSensitivity, Sensitivity, model_signature
from hessq.sensitivity._row_traces import RowTrace, hessian_row_traces
from hessq.sensitivity._traces import METHODS as TRACE_METHODS

__all__ = [
    "LayerSensitivity",
    "RowTrace",
    "Sensitivity",
    "SpectralDensity",
    "TRACE_METHODS",
    "TraceEstimate",
    "hessian_row_traces",
    "hessian_sensitivity",
    "hessian_trace",
    "model_signature",
    "spectral_density",
    "top_eigenvalues",
]

from hessq.sensitivity._kl import is_kl_sensitivity, kl_omega, kl_sensitivity  # noqa: E402  (ZeroQ)

__all__ += ["is_kl_sensitivity", "kl_omega", "kl_sensitivity"]
from hessq.sensitivity._distributed import init_from_env, rank_and_world  # noqa: E402  (torchrun; `hessq analyze`)
__all__ += ["init_from_env", "rank_and_world"]
