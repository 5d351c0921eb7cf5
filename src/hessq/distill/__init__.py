"""Data-free inputs (ZeroQ): distilled data whose BatchNorm statistics match the model's."""

from hessq.distill._distill import DistilledData, batchnorm_layers, distill_data, statistics_loss

__all__ = ["DistilledData", "batchnorm_layers", "distill_data", "statistics_loss"]
