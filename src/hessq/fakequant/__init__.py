"""The fake-quant model: applying a bit plan, calibration, quantization-aware training."""

from hessq.fakequant._finetune import distillation_loss, finetune
from hessq.fakequant._model import QuantizedModel
from hessq.fakequant._quantize import Plan, calibrate, layer_call_order, quantize, resolve_plan

__all__ = ["Plan", "QuantizedModel", "calibrate", "distillation_loss", "finetune", "layer_call_order", "quantize", "resolve_plan"]
