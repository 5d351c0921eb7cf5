"""Finding and rewriting layers: torch.fx tracing, one normalising pass, BatchNorm folding, quantized twins."""

from hessq.graph._fold import fold_batchnorm
from hessq.graph._hf import CapturedModel, EncoderLayout, capture, encoder_layout, register_capture, register_encoder
from hessq.graph._layers import quantizable_layers
from hessq.graph._normalize import normalize
from hessq.graph._rewrite import act_quantizers, check_supported, pooled_bound, quantized_layers, rewrite, traced
from hessq.graph._trace import UnsupportedOpError, UntraceableModelError, trace
from hessq.ops import QuantAdd, QuantCat, QuantConv2d, QuantLayer, QuantLinear, fold_conv_bn, node_location

__all__ = [
    "CapturedModel",
    "EncoderLayout",
    "QuantAdd",
    "QuantCat",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "UnsupportedOpError",
    "UntraceableModelError",
    "act_quantizers",
    "capture",
    "check_supported",
    "encoder_layout",
    "fold_batchnorm",
    "fold_conv_bn",
    "node_location",
    "normalize",
    "pooled_bound",
    "quantizable_layers",
    "quantized_layers",
    "register_capture",
    "register_encoder",
    "rewrite",
    "trace",
    "traced",
]
