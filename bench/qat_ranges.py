"""QAT with activation ranges following each batch (HAWQ's EMA) against ranges kept as calibrated, on MiniLM.

``hessq.finetune(track_ranges=...)``: the same quantized model (uniform weight bits, 8-bit activations, least-squares
ranges calibrated on 8 batches), trained the same number of steps with distillation from FP32, seed 0; accuracy of
the fake-quantized model on the first ``--test-limit`` test texts.

    .venv/bin/python bench/qat_ranges.py [--task tweets] [--bits 3 8] [--qat-steps 80] [--test-limit 1024]

Writes qat_ranges_TASK.json and .md to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import hessq
from hessq.graph import quantizable_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, git_commit, log, machine, write_results  # noqa: E402
from qbert import TASKS, data  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=tuple(TASKS), default="tweets")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--qat-steps", type=int, default=80)
    ap.add_argument("--qat-lr", type=float, default=2e-5)
    ap.add_argument("--test-limit", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    _, batch = TASKS[args.task]
    model = hessq.models.minilm_finetuned(args.task)
    calib = [b for _, b in zip(range(8), data(args.task, "train", batch_size=batch, shuffle=False))]
    train = data(args.task, "train", batch_size=batch, shuffle=True, seed=0)
    test = [b for _, b in zip(range(-(-args.test_limit // 64)), data(args.task, "test", batch_size=64))]

    def accuracy(q) -> float:
        q.integer_eval = False
        return round(100 * float(hessq.accuracy(q, test)), 2)

    rows = []
    for bits in args.bits:
        plan = {n: bits for n in quantizable_layers(model)}
        row = {"weight_bits": bits, "post_training": accuracy(hessq.quantize(model, plan, calib, pin_first_last=None))}
        for track in (True, False):
            t0 = time.time()
            q = hessq.quantize(model, plan, calib, pin_first_last=None)
            hessq.finetune(q, train, teacher=model, epochs=args.qat_steps / len(train), lr=args.qat_lr,
                           optimizer="adamw", seed=0, checkpoint=None, progress=False, track_ranges=track)
            row["tracked" if track else "calibrated"] = accuracy(q.eval())
            row[f"{'tracked' if track else 'calibrated'}_seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        log(row)
    res = {"command": command_line(), "machine": machine(), "commit": git_commit(), "task": args.task,
           "test_texts": sum(len(b["labels"]) for b in test), "qat_steps": args.qat_steps, "rows": rows}
    lines = [f"# QAT on MiniLM ({args.task}): activation ranges tracked or kept as calibrated", "",
             f"`{res['command']}` on {res['machine']} (commit {res['commit']}); {args.qat_steps} steps of AdamW "
             f"(lr {args.qat_lr}) with distillation from FP32, seed 0; fake-quant accuracy on the first "
             f"{res['test_texts']} test texts.", "",
             "| weights | post-training | QAT, ranges tracked (EMA) | QAT, ranges as calibrated |", "|---|---:|---:|---:|"]
    lines += [f"| W{r['weight_bits']}A8 per channel | {r['post_training']:.2f} | {r['tracked']:.2f} | {r['calibrated']:.2f} |"
              for r in rows]
    write_results(args.out / f"qat_ranges_{args.task}.json", res, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
