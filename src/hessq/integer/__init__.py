"""Integer-only inference (HAWQ-V3): dyadic requantization, a bit-exact integer model, files, ONNX."""

from hessq.integer._latency import measure_latency_table, measure_onnx_latency
from hessq.integer._onnx import export_onnx
from hessq.integer._model import IntegerModel, load_integer, to_integer
from hessq.ops import IntegerConversionError, Op

__all__ = ["IntegerConversionError", "IntegerModel", "Op", "export_onnx", "measure_latency_table", "measure_onnx_latency", "load_integer", "to_integer"]
