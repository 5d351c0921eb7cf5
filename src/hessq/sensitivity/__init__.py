"""How much each layer minds low bits: Hessian traces and eigenvalues, KL sensitivity."""

from hessq.sensitivity._result import LayerSensitivity, Sensitivity, model_signature

__all__ = ["LayerSensitivity", "Sensitivity", "model_signature"]

from hessq.sensitivity._kl import is_kl_sensitivity, kl_omega, kl_sensitivity  # noqa: E402  (ZeroQ)

__all__ += ["is_kl_sensitivity", "kl_omega", "kl_sensitivity"]
