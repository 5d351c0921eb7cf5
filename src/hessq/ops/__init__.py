"""Op families: one file each, one registry. See :mod:`hessq.ops._registry` for what a family declares.

``register`` a :class:`QuantOp` subclass to teach every stage a new op (the graph rewrite, the integer
program, both ONNX exports, the cost model and the latency table look families up here).
"""

from hessq.ops._program import Op, ProgramBuilder, Value, channel, compile_graph, run_program
from hessq.ops._registry import (
    IntegerConversionError,
    QuantOp,
    canonical_function,
    describe,
    families,
    family_for_kind,
    family_of,
    family_of_module,
    is_shape_arithmetic,
    node_location,
    register,
    unregister,
    weighted_module_types,
)
from hessq.ops._weighted import WEIGHT_ZERO_POINT, QuantLayer, WeightCodes, WeightedOp, saturates, uint8_weights

# The built-in families, in registration order (a later family wins a match).
from hessq.ops import quant, conv, linear, add, cat, relu, pool, shape, activation, mul, batchnorm, layout, layernorm, attention, deform  # noqa: E402,F401,I001  (registers them)
from hessq.ops import mask, embedding, softmax, matmul  # noqa: E402,F401,I001  (registers them)
from hessq.ops.activation import ElementwiseOp, QuantElementwise, register_elementwise  # noqa: E402
from hessq.ops.add import QuantAdd  # noqa: E402
from hessq.ops.attention import QuantMultiheadAttention  # noqa: E402
from hessq.ops.batchnorm import QuantBatchNorm2d  # noqa: E402
from hessq.ops.cat import QuantCat  # noqa: E402
from hessq.ops.conv import QuantConv2d, fold_conv_bn  # noqa: E402
from hessq.ops.embedding import QuantEmbedding  # noqa: E402
from hessq.ops.matmul import QuantMatmul, matmul_macs  # noqa: E402
from hessq.ops.softmax import QuantSoftmax  # noqa: E402
from hessq.ops.layernorm import QuantLayerNorm  # noqa: E402
from hessq.ops.linear import QuantLinear  # noqa: E402
from hessq.ops.mul import QuantMul  # noqa: E402

__all__ = [
    "WEIGHT_ZERO_POINT",
    "saturates",
    "uint8_weights",
    "ElementwiseOp", "IntegerConversionError", "Op", "QuantBatchNorm2d", "QuantElementwise", "QuantLayerNorm", "QuantMul", "QuantMultiheadAttention", "register_elementwise", "ProgramBuilder", "QuantAdd", "QuantCat", "QuantConv2d", "QuantEmbedding", "QuantLayer", "QuantLinear", "QuantMatmul", "QuantSoftmax",
    "QuantOp", "Value", "WeightCodes", "WeightedOp", "canonical_function", "channel", "compile_graph", "describe", "families", "family_for_kind", "family_of",
    "family_of_module", "fold_conv_bn", "is_shape_arithmetic", "matmul_macs", "node_location", "register", "run_program", "unregister",
    "weighted_module_types",
]
