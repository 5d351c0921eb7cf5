"""How much each layer minds low bits: Hessian traces and eigenvalues, KL sensitivity."""

from hessq.sensitivity._result import LayerSensitivity, Sensitivity, model_signature

__all__ = ["LayerSensitivity", "Sensitivity", "model_signature"]
