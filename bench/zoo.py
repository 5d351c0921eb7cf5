"""torchvision's CNN zoo at W8A8: hessq's integer model against torch.ao FX post-training quantization, in one run.

Every model at random init (seed 0), its BatchNorm statistics warmed by 20 train-mode passes, 3×64×64 Gaussian
inputs (``vit``: torchvision's VisionTransformer class at image 64, patch 16, 2 layers, width 64, its zero-initialised
head drawn at random, as in tests/zoo): the same 4 calibration batches of 8 for both quantizers, 32 held-out inputs to score on. Reported per
model: the signal-to-noise ratio of the logits against FP32 (dB; higher is better) of
  - hessq's integer model (``quantize(model, 8, calib)`` then ``to_integer``; the exact ONNX export equals it),
  - hessq's fast ONNX export (ONNX Runtime's fused int8 kernels) and its agreement with the integer model
    (top-1 and the largest difference, in units of the logits' range),
  - torch.ao FX PTQ (``prepare_fx``/``convert_fx``, the default x86 qconfig mapping: per-channel weights,
    histogram-observed activations), run by PyTorch's quantized CPU kernels.

    python bench/zoo.py [--models resnet18,mobilenet_v3_small,...]

Writes bench/results/zoo.json and bench/results/zoo.md. Needs torchvision (test-only: make installs it).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zoo: torchvision's import on the CPU torch

import hessq  # noqa: E402
from hessq._io import write_text_atomic  # noqa: E402
from tests.zoo._torchvision import torchvision  # noqa: E402
from tests.zoo.test_torchvision_zoo import FAST, SHAPE, SLOW, warmed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (reference.double() - approx.double()).pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise)) if noise > 0 else float("inf")


def torch_ao_ptq(model: torch.nn.Module, calib: list[torch.Tensor]) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example_inputs=(calib[0],))
        with torch.no_grad():
            for x in calib:
                prepared(x)
        return convert_fx(prepared)


def run(name: str) -> dict:
    start = time.perf_counter()
    model = warmed(name)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, *SHAPE, generator=g) for _ in range(4)]
    x = torch.randn(32, *SHAPE, generator=g)
    with torch.no_grad():
        y_fp = model(x)
    row: dict = {"model": name}
    imodel = hessq.to_integer(hessq.quantize(model, 8, [(c,) for c in calib]))
    y_int = imodel(x)
    row["hessq_snr_db"] = snr_db(y_fp, y_int)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fast.onnx"
        hessq.export_onnx(imodel, path, mode="fast")
        y_fast = torch.from_numpy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0])
    row["fast_snr_db"] = snr_db(y_fp, y_fast)
    row["fast_top1_agreement"] = float((y_fast.argmax(1) == y_int.argmax(1)).float().mean())
    row["fast_max_diff_of_range"] = float((y_fast - y_int).abs().max() / (y_int.max() - y_int.min()))
    try:
        with torch.no_grad():
            row["torch_ao_snr_db"] = snr_db(y_fp, torch_ao_ptq(model, calib)(x))
    except Exception as exc:  # noqa: BLE001 - a model torch.ao cannot take is a result too
        row["torch_ao_snr_db"] = None
        row["torch_ao_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    row["seconds"] = time.perf_counter() - start
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | hessq integer SNR (dB) | torch.ao FX PTQ SNR (dB) | hessq fast ONNX SNR (dB) | fast = integer top-1 | fast max diff / range |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ao = "—" if r["torch_ao_snr_db"] is None else f"{r['torch_ao_snr_db']:.1f}"
        lines.append(f"| {r['model']} | {r['hessq_snr_db']:.1f} | {ao} | {r['fast_snr_db']:.1f} | "
                     f"{100 * r['fast_top1_agreement']:.0f}% | {r['fast_max_diff_of_range']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(FAST + SLOW))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torchvision()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows.append(run(name))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"torch": torch.__version__, "onnxruntime": ort.__version__, "machine": platform.processor() or platform.machine(),
            "inputs": "3x64x64 Gaussian; 4x8 calibration, 32 scored; random init, BN warmed by 20 train passes"}
    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(RESULTS / "zoo.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_text_atomic(RESULTS / "zoo.md", "# torchvision zoo, W8A8: hessq vs torch.ao FX PTQ (SNR against FP32)\n\n"
                      + f"{meta['inputs']}; torch {meta['torch']}, onnxruntime {meta['onnxruntime']}.\n\n" + markdown(rows))


if __name__ == "__main__":
    main()
