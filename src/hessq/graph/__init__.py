"""Finding and rewriting layers: torch.fx tracing, BatchNorm folding, quantized twins."""

from hessq.graph._layers import QUANTIZABLE_TYPES, quantizable_layers

__all__ = ["QUANTIZABLE_TYPES", "quantizable_layers"]
