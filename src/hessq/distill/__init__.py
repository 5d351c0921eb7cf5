"""Data-free inputs (ZeroQ): distilled data whose BatchNorm statistics match the model's."""

from hessq.distill._distill import DistilledData, batchnorm_layers, distill_data, statistics_loss
from hessq.distill._distill import _input_range as check_input_range  # (low, high) floats or None; ConfigError else

__all__ = ["DistilledData", "batchnorm_layers", "check_input_range", "distill_data", "statistics_loss"]
