"""The whole pipeline in one call: sensitivity → plan → quantize → (QAT) → integer → verify → export → report."""

from hessq.pipeline._compress import (
    DEMO_CHECKPOINT,
    CompressResult,
    FinetuneConfig,
    check_options,
    check_out_dir,
    compress,
    evaluate_setting,
    publish,
    qat_checkpoint_path,
    recover_out_dir,
)

__all__ = ["DEMO_CHECKPOINT", "CompressResult", "FinetuneConfig", "check_options", "check_out_dir", "compress", "evaluate_setting",
           "publish", "qat_checkpoint_path", "recover_out_dir"]
