"""Helpers of the text benches: a Hugging Face sequence classifier in ONNX Runtime and torch.ao, scored
on dict batches (``input_ids``, ``attention_mask``, ``labels``) and timed at fixed shapes.

- :func:`export_classifier_onnx`: the FP32 model as ONNX, inputs ``input_ids`` and ``attention_mask``
  (int64, dynamic batch and length), output ``logits``; the TorchScript-based exporter (``dynamo=False``),
  which traces transformers 5's BERT here; the dynamo exporter needs onnxscript, not installed;
- :func:`ort_quantize_dynamic`: ONNX Runtime's ``quantize_dynamic`` (int8 weights, activations
  quantized on the fly per tensor), its own default settings;
- :func:`torch_dynamic_int8`: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``;
- :func:`ort_accuracy`, :func:`ort_latency_ms`, :func:`torch_latency_ms`.

Not a bench: ``make bench`` runs it as a script, which does nothing.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_ms, ort_session  # noqa: E402

INPUT_NAMES = ("input_ids", "attention_mask")


class LogitsOf(nn.Module):
    """``model(input_ids, attention_mask).logits`` as a plain function of two tensors (what the exporters need)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out[0]


def example_inputs(batch: int, length: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A fixed-shape batch of ordinary token ids, the last quarter of each row padding (deterministic)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (batch, length), generator=gen)
    ids[:, 0], ids[:, length * 3 // 4 :] = 101, pad_id
    return {"input_ids": ids, "attention_mask": (ids != pad_id).long()}


def export_classifier_onnx(model: nn.Module, path: str | os.PathLike, length: int = 64) -> None:
    """``model`` (a Hugging Face classifier, eval mode) as FP32 ONNX (opset 17) at ``path``."""
    inputs = example_inputs(2, length)
    dynamic = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
               "logits": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOf(model).eval(), (inputs["input_ids"], inputs["attention_mask"]), str(path),
                          input_names=list(INPUT_NAMES), output_names=["logits"], dynamic_axes=dynamic,
                          opset_version=17, dynamo=False)


def ort_quantize_dynamic(fp32_path: str | os.PathLike, int8_path: str | os.PathLike) -> None:
    """ONNX Runtime's dynamic int8 quantization of the exported model (weights QInt8, its defaults otherwise)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` in torch.ao's dynamic int8 (int8 weights, activations per batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def _feeds(batch: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: batch[name].numpy() for name in INPUT_NAMES}


def ort_accuracy(session, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Fraction of samples whose top logit from the ONNX Runtime session is their label."""
    correct = total = 0
    for batch in batches:
        logits = session.run(None, _feeds(batch))[0]
        correct += int((logits.argmax(-1) == batch["labels"].numpy()).sum())
        total += len(batch["labels"])
    return correct / total


def ort_latency_ms(path: str | os.PathLike, batch: int, length: int, repeats: int, threads: int) -> float:
    """Median milliseconds of one ONNX Runtime run at ``batch`` × ``length`` tokens, ``threads`` intra-op threads."""
    session = ort_session(path, threads)
    feeds = _feeds(example_inputs(batch, length))
    return median_ms(lambda: session.run(None, feeds), repeats, warmup=1)


@torch.no_grad()
def torch_latency_ms(model: nn.Module, batch: int, length: int, repeats: int) -> float:
    """Median milliseconds of one PyTorch forward at ``batch`` × ``length`` tokens (the current thread count)."""
    inputs = example_inputs(batch, length)
    wrapped = LogitsOf(model).eval()
    return median_ms(lambda: wrapped(**inputs), repeats, warmup=1)




def ort_dynamic_accuracy(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, float]:
    """(test accuracy, file size in MB) of ONNX Runtime's ``quantize_dynamic`` int8 of ``model``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_classifier_onnx(model, fp32)
        ort_quantize_dynamic(fp32, int8)
        return ort_accuracy(ort_session(int8, None), batches), int8.stat().st_size / 1e6
