"""The whole pipeline in one call: sensitivity → plan → quantize → (QAT) → integer → verify → export → report."""

from hessq.compress._compress import CompressResult, FinetuneConfig, compress, evaluate_setting

__all__ = ["CompressResult", "FinetuneConfig", "compress", "evaluate_setting"]
