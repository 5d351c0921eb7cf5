"""Integer-only MiniLM (issue 17), accuracy and bit-exactness part: on the whole test set of each task, side by side
in one run.

Rows, each scored on every test text (padded to the task's length, T=64 tweets, T=256 BBC):
- FP32: the fine-tuned Hugging Face model;
- hessq W8A8 and the Hessian mixed plan (from ``--mixed-plan``, the ``qbert.json`` that ``bench/qbert.py`` wrote; after
  ``--qat-steps`` steps of QAT with distillation, for each of ``--seeds`` QAT seeds 0, 1, ..., as there), each as
  - fake quant: the quantized model's float forward (``float_forward``: float arithmetic, fake-quantized values),
  - integer: ``hessq.to_integer`` of it (integer arithmetic only), and the quantized model's eval mode,
  - exact ONNX: ``export_onnx(mode="exact")`` in ONNX Runtime.

Bit-exactness is the fraction of test texts whose logits are equal, every bit: the quantized model's eval mode
against the integer model, and the exact ONNX export against the integer model (both must be 100%). Fake quant
against integer is the same arithmetic up to the dyadic roundings, so there the table gives the top-1 agreement and
the largest logit difference. Sizes: the integer model's ``.hq`` file (2-4-bit weights packed) and the ONNX file.

    .venv/bin/python bench/ibert_exact.py [--tasks tweets bbc] [--mixed-plan bench/results/qbert_TASK.json]

Writes ibert_exact.json and ibert_exact.md to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

import hessq
from hessq.plan import evaluate_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, git_commit, log, machine, write_results  # noqa: E402
from qbert import TASKS, Task, run_tasks  # noqa: E402


def padded(ids: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(ids, (0, length - ids.shape[1]))


def mixed_bits(path: Path, task: str) -> dict[str, int] | None:
    """The Hessian mixed plan's bits for ``task`` from a qbert.json (a BitPlan with the word table's row widths when
    the plan had row tiers), or None when it has none."""
    if not path.is_file():
        return None
    for res in json.loads(path.read_text())["results"]:
        if res["task"] == task:
            for row in res["rows"]:
                if row["setting"].startswith("Hessian mixed") and row.get("bits"):
                    bits = {k: int(v) for k, v in row["bits"].items()}
                    return hessq.BitPlan(bits, row_bits=row["row_bits"]) if row.get("row_bits") else bits
    return None


def score(name: str, q, test: list[dict[str, torch.Tensor]], length: int, tmp: Path) -> dict[str, Any]:
    """Accuracy of the fake-quant, integer and exact-ONNX forms of ``q``, and their agreement, on every test text."""
    t0 = time.time()
    im = hessq.to_integer(q, input_shape=(length,))
    hq, onnx_path = tmp / f"{len(list(tmp.iterdir()))}.hq", tmp / f"{len(list(tmp.iterdir()))}.onnx"
    im.save(hq)
    hessq.export_onnx(im, onnx_path, mode="exact")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    correct = {"fake quant": 0, "integer": 0, "exact ONNX": 0}
    eval_equal = onnx_equal = top1_fake = total = 0
    max_fake_diff = 0.0
    q.eval()
    # texts per forward: as many token pairs in the attention scores as 64 tweets at T=64 (the exact ONNX graph
    # holds float64 copies of them)
    chunk = max(1, 64 * 64 * 64 // (length * length))
    pieces = [(ids, labels) for b in test
              for ids, labels in zip(padded(b["input_ids"], length).split(chunk), b["labels"].split(chunk))]
    for ids, labels in pieces:
        with torch.no_grad():
            fake = q.float_forward(ids)
            in_eval = q(ids)
        y = im(ids)
        y_onnx = torch.from_numpy(session.run(None, {"input": ids.numpy()})[0])
        correct["fake quant"] += int((fake.argmax(1) == labels).sum())
        correct["integer"] += int((y.argmax(1) == labels).sum())
        correct["exact ONNX"] += int((y_onnx.argmax(1) == labels).sum())
        eval_equal += int((in_eval == y).all(1).sum())
        onnx_equal += int((y_onnx == y).all(1).sum())
        top1_fake += int((fake.argmax(1) == y.argmax(1)).sum())
        max_fake_diff = max(max_fake_diff, float((fake - y).abs().max()))
        total += len(labels)
    out = {f"{k} accuracy": v / total for k, v in correct.items()}
    out.update({"eval mode = integer": eval_equal / total, "exact ONNX = integer": onnx_equal / total,
                "fake quant top-1 = integer": top1_fake / total, "max |fake - integer| logit": max_fake_diff,
                "hq_mb": hq.stat().st_size / 1e6, "onnx_mb": onnx_path.stat().st_size / 1e6, "texts": total,
                "seconds": time.time() - t0})
    log(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def run_task(task: str, args, done: list[dict[str, Any]]) -> dict[str, Any]:
    length = TASKS[task][0]
    setup = SimpleNamespace(calibration_batches=args.calibration_batches, sensitivity_batches=1, test_limit=args.test_limit,
                            qat_steps=args.qat_steps, qat_lr=args.qat_lr, qat_ranges=args.qat_ranges,
                            qat_hidden_weight=args.qat_hidden_weight)
    t = Task(task, setup)
    test = list(t.test)
    result: dict[str, Any] = {"task": task, "length": length, "rows": {}}

    def save_now() -> None:
        save(args, done + [result])

    correct = total = 0
    for b in test:
        ids = padded(b["input_ids"], length)
        with torch.no_grad():
            logits = t.model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        correct += int((logits.argmax(1) == b["labels"]).sum())
        total += len(b["labels"])
    result["fp32"] = correct / total
    log(f"[{task}] FP32 {100 * result['fp32']:.2f}% on {total} texts")
    save_now()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w8 = t.quantize({n: 8 for n in t.layers})
        if args.w8a8_qat:
            w8 = t.qat(w8, seed=0)
        name = "W8A8 (after QAT)" if args.w8a8_qat else "W8A8"
        result["rows"][name] = score(f"[{task}] {name}", w8, test, length, tmp)
        save_now()
        plan_file = Path(args.mixed_plan or RESULTS / f"qbert_{task}.json")
        bits = mixed_bits(plan_file, task)
        if bits is None:
            log(f"[{task}] no Hessian mixed plan in {plan_file}: run bench/qbert.py --tasks {task} first")
        else:
            # one row per QAT seed, as bench/qbert.py's mixed row has: its integer twin is judged on the same seeds
            for seed in range(args.seeds):
                q = t.qat(t.quantize(bits), seed=seed)
                name = "Hessian mixed (after QAT)" + (f", seed {seed}" if args.seeds > 1 else "")
                result["rows"][name] = {
                    "average_bits": evaluate_plan(t.model, bits).average_bits,  # the row tiers counted
                    "seed": seed, **score(f"[{task}] mixed, seed {seed}", q, test, length, tmp)}
                save_now()
    result["complete"] = True
    save_now()
    return result


def save(args, results: list[dict[str, Any]]) -> None:
    meta = {"command": command_line(), "machine": machine(), "commit": git_commit(), "onnxruntime": ort.__version__}
    write_results(Path(args.out) / "ibert_exact.json", {"meta": meta, "results": results}, markdown(meta, results))


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    out = ["# Integer-only MiniLM: accuracy and bit-exactness on the whole test sets", "",
           f"`{meta['command']}` on {meta['machine']} (commit {meta['commit']}, onnxruntime {meta['onnxruntime']}).", "",
           "Every test text, padded to the task's length. *eval = integer*: the quantized model's eval mode against "
           "`hessq.to_integer`, and *ONNX = integer*: the exact ONNX export in ONNX Runtime against it, as the fraction "
           "of texts whose logits are equal bit for bit. Fake quant is the float forward of the same quantized model "
           "(float arithmetic: it differs from the integer model by the dyadic roundings).", ""]
    for res in results:
        out += [f"## {res['task']} (T={res['length']}, FP32 {100 * res.get('fp32', float('nan')):.2f}%"
                f"{'' if res.get('complete') else ', incomplete'})", "",
                "| setting | fake quant | integer | exact ONNX | integer − fake | eval = integer | ONNX = integer "
                "| top-1 fake = integer | max Δlogit fake | .hq MB | ONNX MB |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in res["rows"].items():
            out.append(
                f"| {name} | {100 * r['fake quant accuracy']:.2f} | {100 * r['integer accuracy']:.2f} | "
                f"{100 * r['exact ONNX accuracy']:.2f} | {100 * (r['integer accuracy'] - r['fake quant accuracy']):+.2f} | "
                f"{100 * r['eval mode = integer']:.2f}% | {100 * r['exact ONNX = integer']:.2f}% | "
                f"{100 * r['fake quant top-1 = integer']:.2f}% | {r['max |fake - integer| logit']:.3f} | "
                f"{r['hq_mb']:.2f} | {r['onnx_mb']:.1f} |")
        seeds = [r for name, r in res["rows"].items() if name.startswith("Hessian mixed") and "seed" in r]
        if len(seeds) > 1:
            fake, integer = (100 * np.array([r[f"{k} accuracy"] for r in seeds]) for k in ("fake quant", "integer"))
            out += ["", f"Hessian mixed over {len(seeds)} QAT seeds: fake quant {fake.mean():.2f}, integer "
                        f"{integer.mean():.2f}, integer − fake {integer.mean() - fake.mean():+.2f} (per seed: "
                        + ", ".join(f"{d:+.2f}" for d in integer - fake) + ")."]
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["tweets"], choices=list(TASKS))
    ap.add_argument("--mixed-plan", default=None,
                    help="a qbert.json holding the mixed plan (default bench/results/qbert_TASK.json, per task)")
    ap.add_argument("--qat-steps", type=int, default=80)
    ap.add_argument("--qat-lr", type=float, default=2e-5)
    ap.add_argument("--qat-ranges", choices=("track", "frozen"), default="frozen",
                    help="activation ranges in QAT: follow each batch (EMA) or stay as calibrated (as bench/qbert.py)")
    ap.add_argument("--w8a8-qat", action="store_true",
                    help="train the W8A8 model too (--qat-steps, seed 0) before scoring it, as HAWQ-V3's INT8 rows are")
    ap.add_argument("--qat-hidden-weight", type=float, default=0.0, help="hidden-state distillation weight in QAT")
    ap.add_argument("--seeds", type=int, default=1, help="QAT seeds of the mixed row (0, 1, ...), each scored")
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--test-limit", type=int, default=None, help="score the first N test texts only (a quick check)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    return run_tasks(run_task, args)


if __name__ == "__main__":
    sys.exit(main())
