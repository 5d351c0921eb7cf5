"""Uniform quantization of tensors: formulas, range observers and quantizer modules."""

from hessq.quantizer._dyadic import DYADIC_BITS, dyadic, dyadic_value, requantize
from hessq.quantizer._kernels import KERNELS, choose_kernel
from hessq.quantizer._kernels import conv2d as integer_conv2d
from hessq.quantizer._kernels import linear as integer_linear
from hessq.quantizer._functional import (
    ACT_BITS,
    GRANULARITIES,
    Granularity,
    WEIGHT_BITS,
    check_act_bits,
    check_granularity,
    check_weight_bits,
    expand_scale,
    fake_quantize,
    fake_quantize_weight,
    least_squares_clip,
    qrange,
    quantization_error,
    quantize_weight,
    round_ste,
    symmetric_scale,
    weight_scale_like,
)
from hessq.quantizer._modules import ActQuantizer, WeightQuantizer, default_percentile
from hessq.quantizer._observer import RANGE_METHODS, RangeMethod, RangeObserver, percentile_bounds

__all__ = [
    "Granularity",
    "KERNELS",
    "RangeMethod",
    "choose_kernel",
    "integer_conv2d",
    "integer_linear",
    "percentile_bounds",
    "default_percentile",
    "DYADIC_BITS",
    "dyadic",
    "dyadic_value",
    "requantize",
    "ACT_BITS",
    "GRANULARITIES",
    "RANGE_METHODS",
    "WEIGHT_BITS",
    "ActQuantizer",
    "RangeObserver",
    "WeightQuantizer",
    "check_act_bits",
    "check_granularity",
    "check_weight_bits",
    "expand_scale",
    "fake_quantize",
    "fake_quantize_weight",
    "least_squares_clip",
    "qrange",
    "quantization_error",
    "quantize_weight",
    "round_ste",
    "symmetric_scale",
    "weight_scale_like",
]
