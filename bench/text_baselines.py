"""The baselines of Q-BERT's table (issue 16), side by side in one run: all-MiniLM-L6-v2 fine-tuned on
BBC News and on tweets (``hessq.models.minilm_finetuned``: from the cache, fine-tuned into it on first use)
in FP32 PyTorch, FP32 ONNX Runtime, ONNX Runtime ``quantize_dynamic`` int8 and torch.ao dynamic int8.

Test accuracy on the full test split (BBC 445 articles, tweets 4,628), each batch padded to its longest;
median latency at batch 1 and 32 with every sequence ``max_length`` long (BBC 256 tokens, tweets 64; the
last quarter of each row padding), ONNX Runtime on ``--threads`` intra-op threads (2), PyTorch on as many.

    python bench/text_baselines.py [--tasks bbc,tweets] [--threads 2] [--quick]

Writes bench/results/text_baselines.json and bench/results/text_baselines.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

import hessq
from hessq.models import classifier_accuracy, minilm_finetuned
from hessq.models._minilm import TASKS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, git_commit, log, machine, ort_session, write_results  # noqa: E402
from _text import (INPUT_NAMES, export_classifier_onnx, ort_accuracy, ort_latency_ms, ort_quantize_dynamic,  # noqa: E402
                   torch_dynamic_int8, torch_latency_ms)

BATCHES = (1, 32)


def state_mb(model: torch.nn.Module) -> float:
    """Megabytes of the model's state dict as stored (quantized packed weights counted at their own width)."""
    total = 0
    for value in model.state_dict().values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, tuple):  # torch.ao's packed (weight, bias) of a dynamic quantized Linear
            total += sum(v.numel() * v.element_size() for v in value if isinstance(v, torch.Tensor))
    return total / 1e6


def run_task(task: str, threads: int, repeats: dict[int, int], limit: int | None, tmp: Path) -> dict:
    spec = TASKS[task]
    model = minilm_finetuned(task)
    info = model.hessq_finetune
    log(f"{task}: fine-tune from the cache (recorded FP32 test accuracy {info.get('test_accuracy')})")
    test = spec.load("test", batch_size=64, limit=limit)
    length = spec.max_length
    fp32_onnx, int8_onnx = tmp / f"{task}_fp32.onnx", tmp / f"{task}_int8.onnx"
    export_classifier_onnx(model, fp32_onnx)
    ort_quantize_dynamic(fp32_onnx, int8_onnx)
    ao = torch_dynamic_int8(model)
    log(f"{task}: exported and quantized")

    first = test.take(1)[0]
    with torch.no_grad():
        reference = model(**{k: first[k] for k in INPUT_NAMES}).logits
    onnx_diff = float((torch.from_numpy(ort_session(fp32_onnx, threads).run(None, {k: first[k].numpy() for k in INPUT_NAMES})[0])
                       - reference).abs().max())

    rows = []
    settings = [
        ("PyTorch FP32", "torch", model, state_mb(model)),
        ("ONNX Runtime FP32", "ort", fp32_onnx, fp32_onnx.stat().st_size / 1e6),
        ("ONNX Runtime quantize_dynamic int8", "ort", int8_onnx, int8_onnx.stat().st_size / 1e6),
        ("torch.ao quantize_dynamic int8 (Linear)", "torch", ao, state_mb(ao)),
    ]
    for name, kind, obj, size_mb in settings:
        if kind == "torch":
            acc = classifier_accuracy(obj, test)
            ms = {b: torch_latency_ms(obj, b, length, repeats[b]) for b in BATCHES}
        else:
            acc = ort_accuracy(ort_session(obj, threads), test)
            ms = {b: ort_latency_ms(obj, b, length, repeats[b], threads) for b in BATCHES}
        rows.append({"setting": name, "test_accuracy": acc, "size_mb": size_mb, **{f"ms_b{b}": ms[b] for b in BATCHES}})
        log(f"{task}: {name}: {100 * acc:.2f}%, {size_mb:.1f} MB, " + ", ".join(f"b={b} {ms[b]:.1f} ms" for b in BATCHES))
    return {"task": task, "test_samples": test.num_samples, "max_length": length, "classes": list(test.class_names),
            "finetune": info, "onnx_fp32_max_abs_logit_diff": onnx_diff, "rows": rows}


def markdown(meta: dict, results: list[dict]) -> str:
    lines = ["# Q-BERT baselines: all-MiniLM-L6-v2 fine-tuned, FP32 and int8 (PyTorch, ONNX Runtime)", "",
             f"{meta['machine']}; torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, hessq {meta['hessq']} "
             f"(commit {meta['commit']}). `{meta['command']}`", "",
             "Latency: median milliseconds of one run at batch b, every sequence max_length tokens long (BBC 256, "
             f"tweets 64), {meta['threads']} threads. The machine's 2 cores were shared with other jobs while this ran: "
             "absolute times are inflated and noisy; compare rows of one table, not with other files.", ""]
    for r in results:
        ft = r["finetune"]
        lines += [f"### {r['task']} ({r['test_samples']} test samples, max {r['max_length']} tokens)", "",
                  f"Fine-tune: recipe {ft['recipe']}, {ft.get('finetune_seconds')} s on {ft.get('trained_on')}; "
                  f"recorded FP32 test accuracy {100 * ft.get('test_accuracy', float('nan')):.2f}%. "
                  f"ONNX FP32 vs PyTorch: largest logit difference {r['onnx_fp32_max_abs_logit_diff']:.2e}.", "",
                  "| setting | test accuracy (%) | size (MB) | ms b=1 | ms b=32 |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['setting']} | {100 * row['test_accuracy']:.2f} | {row['size_mb']:.1f} | "
                         f"{row['ms_b1']:.1f} | {row['ms_b32']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="bbc,tweets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 test samples and 3 timing repeats (a smoke run)")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {sorted(TASKS)}")
    torch.set_num_threads(args.threads)
    repeats = {1: 3, 32: 3} if args.quick else {1: 15, 32: 5}
    meta = {"machine": machine(args.threads), "threads": args.threads, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "hessq": hessq.__version__, "commit": git_commit(),
            "command": command_line(), "quick": args.quick, "statistic": "median milliseconds",
            "latency_inputs": "batch × max_length token ids, the last quarter of each row padding"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            results.append(run_task(task, args.threads, repeats, 64 if args.quick else None, Path(tmp)))
    name = "text_baselines_quick" if args.quick else "text_baselines"
    write_results(RESULTS / f"{name}.json", {"meta": meta, "results": results}, markdown(meta, results))
    log(f"wrote {RESULTS / name}.json and .md")


if __name__ == "__main__":
    main()
