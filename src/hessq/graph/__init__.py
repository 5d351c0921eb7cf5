"""Finding and rewriting layers: torch.fx tracing, BatchNorm folding, quantized twins."""

from hessq.graph._fold import fold_batchnorm, fold_conv_bn
from hessq.graph._layers import QUANTIZABLE_TYPES, quantizable_layers
from hessq.graph._qmodules import QUANT_LAYER_TYPES, QuantAdd, QuantCat, QuantConv2d, QuantLinear
from hessq.graph._rewrite import act_quantizers, check_supported, quantized_layers, rewrite
from hessq.graph._trace import UnsupportedOpError, UntraceableModelError, node_location, trace

__all__ = [
    "QUANTIZABLE_TYPES",
    "QUANT_LAYER_TYPES",
    "QuantAdd",
    "QuantCat",
    "QuantConv2d",
    "QuantLinear",
    "UnsupportedOpError",
    "UntraceableModelError",
    "act_quantizers",
    "check_supported",
    "fold_batchnorm",
    "fold_conv_bn",
    "node_location",
    "quantizable_layers",
    "quantized_layers",
    "rewrite",
    "trace",
]
