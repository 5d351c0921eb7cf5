"""``hessq demo``: the pipeline on the bundled ResNet-20 and Fashion-MNIST, written to a report."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from hessq._io import write_text_atomic


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline on the bundled ResNet-20 and Fashion-MNIST, write a report")
    p.add_argument("--out", type=Path, default=Path("hessq-out"), help="output folder (default: hessq-out)")
    p.add_argument("--qat-epochs", type=float, default=1.0, help="epochs of W4A4 quantization-aware training (default 1)")
    p.add_argument("--qat-lr", type=float, default=0.01, help="QAT learning rate (default 0.01)")
    p.add_argument("--calibration-batches", type=int, default=8, help="training batches of 128 used for calibration")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images (default: all 10,000)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _markdown(rows: list[dict[str, Any]], fp32: float) -> str:
    lines = [
        "| setting | weights / activations | top-1 (%) | Δ vs FP32 (points) | time (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['bits']} | {100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - fp32):+.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import hessq
    from hessq.data import accuracy, fashion_mnist
    from hessq.models import resnet20

    progress = not args.no_progress
    torch.manual_seed(args.seed)
    test = fashion_mnist("test", root=args.data_dir, batch_size=500, limit=args.test_limit)
    train = fashion_mnist("train", root=args.data_dir, batch_size=128, augment=True, seed=args.seed)
    calib = fashion_mnist("train", root=args.data_dir, batch_size=128, shuffle=True, seed=args.seed + 1).take(args.calibration_batches)
    model = resnet20(pretrained=True)
    rows: list[dict[str, Any]] = []

    def record(name: str, bits: str, m: torch.nn.Module, start: float, **extra: Any) -> float:
        acc = accuracy(m, test, progress=progress, desc=f"evaluate {name}")
        rows.append({"name": name, "bits": bits, "accuracy": acc, "seconds": time.time() - start, **extra})
        print(f"{name:<24} {bits:<22} top-1 {100 * acc:6.2f}%", flush=True)
        return acc

    start = time.time()
    fp32 = record("FP32", "32 / 32", model, start)
    start = time.time()
    record("W8A8 PTQ", "8 / 8", hessq.quantize(model, (8, 8), calib, progress=progress), start)
    start = time.time()
    w4a4 = hessq.quantize(model, (4, 4), calib, progress=progress)
    record("W4A4 PTQ", "4 / 4 (first, last 8)", w4a4, start)
    start = time.time()
    steps = max(1, int(round(args.qat_epochs * len(train))))
    history = hessq.finetune(
        w4a4,
        train,
        teacher=model,
        epochs=max(1, int(-(-args.qat_epochs // 1))),
        max_steps=steps,
        lr=args.qat_lr,
        checkpoint=args.out / "qat-w4a4.ckpt",
        resume=False,
        seed=args.seed,
        progress=progress,
    )
    record("W4A4 QAT", "4 / 4 (first, last 8)", w4a4, start, qat_steps=history["steps"], qat_loss=history["epoch_loss"])

    results = {
        "hessq_version": hessq.__version__,
        "model": "resnet20 (bundled, Fashion-MNIST)",
        "test_images": len(test.inputs),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "fp32_accuracy": fp32,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "results.json", json.dumps(results, indent=2))
    table = f"# hessq demo: ResNet-20 on Fashion-MNIST ({len(test.inputs)} test images)\n\n" + _markdown(rows, fp32)
    write_text_atomic(args.out / "results.md", table)
    print()
    print(table)
    print(f"report: {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0
