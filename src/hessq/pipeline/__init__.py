"""The whole pipeline in one call: sensitivity → plan → quantize → (QAT) → integer → verify → export → report.

Each stage's settings are a small frozen config (:class:`SensitivityConfig`, :class:`PlanConfig`,
:class:`QuantizeConfig`, :class:`DistillConfig`, :class:`FinetuneConfig`, :class:`ExportConfig`):
the one place their defaults live, read by :func:`compress` and by the command line alike.
"""

from hessq.pipeline._compress import (
    DEMO_CHECKPOINT,
    CompressResult,
    check_options,
    check_out_dir,
    compress,
    evaluate_setting,
    publish,
    qat_checkpoint_path,
    recover_out_dir,
)
from hessq.pipeline._config import (
    CONFIG_ARGUMENTS,
    FLAT_OPTIONS,
    DistillConfig,
    ExportConfig,
    FinetuneConfig,
    PlanConfig,
    QuantizeConfig,
    SensitivityConfig,
    config_from_dict,
)

__all__ = ["CONFIG_ARGUMENTS", "DEMO_CHECKPOINT", "FLAT_OPTIONS", "CompressResult", "DistillConfig", "ExportConfig",
           "FinetuneConfig", "PlanConfig", "QuantizeConfig", "SensitivityConfig", "check_options", "check_out_dir",
           "compress", "config_from_dict", "evaluate_setting", "publish", "qat_checkpoint_path", "recover_out_dir"]
