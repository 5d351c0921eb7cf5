"""Q-BERT on a real pretrained BERT (all-MiniLM-L6-v2) and real text: BBC News (5 classes) and tweets (sentiment).

One table per task, side by side in one run, test accuracy and model size:

* FP32 (the fine-tuned checkpoint, Hugging Face's own BertForSequenceClassification head), ONNX Runtime
  ``quantize_dynamic`` int8, hessq W8A8 with 8-bit embeddings;
* uniform W4 and W3 (activations 8 bits, embeddings at the same bits per row) per output channel, in Q-BERT's
  row groups (128 groups) and in input-dimension blocks (128 columns), post-training and after QAT;
* the Hessian mixed plan over 2-8 bits at an average of 3 weight bits (embeddings included: the same bytes as
  uniform W3 per channel) after QAT, mean and 95% interval over 3 QAT seeds (each its own order of the training
  texts); the same size with the sensitivity order reversed, and the median of random plans (traces permuted over
  the layers), post-training and after QAT.

Accuracy is that of hessq's fake-quantized model (float fake quantization, ``integer_eval=False``: the integer
program recompiles for every padded length; bench/ibert_exact.py scores the integer model, and
bench/ibert_agreement.py shows where the two part); QAT is ``hessq.finetune``
(AdamW) with distillation from the FP32 model, ``--qat-steps`` steps, the activation ranges kept as calibrated
(``--qat-ranges frozen``, the default; ``track`` follows each batch: bench/qat_ranges.py compares the two). The
table is rewritten after every row.

    .venv/bin/python bench/qbert.py [--tasks bbc tweets] [--qat-steps 150] [--random-plans 5] [--seeds 3]

Writes qbert.json and qbert.md to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hessq
from hessq.graph import quantizable_layers
from hessq.plan import CURVATURES, evaluate_plan, lookup_counts, plan_bits
from hessq.sensitivity import RowTrace, Sensitivity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, log, machine, write_results  # noqa: E402
from plan import random_sensitivity, reverse_sensitivity  # noqa: E402

#: (max tokens, train batch) per task, as issue 16 fixes them
TASKS = {"bbc": (256, 16), "tweets": (64, 32)}
GROUPINGS = {  # name -> quantize() keywords
    "per channel": dict(weight_granularity="channel"),
    "128 row groups (Q-BERT)": dict(weight_granularity="group", num_groups=128),
    "128-column blocks": dict(weight_granularity="block", block_size=128),
}
MIXED_BITS = (2, 3, 4, 5, 6, 8)
WORD = "bert.embeddings.word_embeddings"
SCALE_BYTES = 4  # a float32 weight scale, as hessq.plan's cost model counts one per output channel


def data(task: str, split: str, **kw):
    from hessq import data as D

    return (D.bbc_news if task == "bbc" else D.tweets)(split, **kw)


class Task:
    def __init__(self, task: str, args) -> None:
        self.name = task
        length, batch = TASKS[task]
        self.model = hessq.models.minilm_finetuned(task, progress=True)
        self.batch = batch
        self.train = data(task, "train", batch_size=batch, shuffle=True, seed=0)
        calib_source = data(task, "train", batch_size=batch, shuffle=False)
        self.calib = [b for _, b in zip(range(args.calibration_batches), calib_source)]
        self.sens_batches = [b for _, b in zip(range(args.sensitivity_batches), calib_source)]
        test = data(task, "test", batch_size=64)
        self.test = test if args.test_limit is None else [b for _, b in zip(range(-(-args.test_limit // 64)), test)]
        self.layers = list(quantizable_layers(self.model))
        self.args = args

    def accuracy(self, model) -> float:
        if hasattr(model, "integer_eval"):
            model.integer_eval = False
        return float(hessq.accuracy(model, self.test))

    def size_mb(self, plan, q=None) -> float:
        """The plan's bytes; given its quantized model ``q``, with the scales its weight grouping stores (the
        cost model counts one per output channel: Q-BERT's 128 row groups store fewer, 128-column blocks more)."""
        return (evaluate_plan(self.model, plan).size_bytes + SCALE_BYTES * (0 if q is None else extra_scales(q))) / 1e6

    def quantize(self, plan, **kw):
        return hessq.quantize(self.model, plan, self.calib, pin_first_last=None, **kw)

    def qat(self, q, seed: int = 0):
        # a whole cosine schedule over --qat-steps steps (a fraction of an epoch); each seed draws its own
        # order of the training texts (the loader's generator), not only its own global RNG state
        train = self.train if seed == 0 else data(self.name, "train", batch_size=self.batch, shuffle=True, seed=seed)
        epochs = min(1.0, self.args.qat_steps / len(train))
        hessq.finetune(q, train, teacher=self.model, epochs=epochs, lr=self.args.qat_lr,
                       optimizer="adamw",
                       seed=seed, checkpoint=None, progress=False, track_ranges=self.args.qat_ranges == "track",
                       hidden_weight=self.args.qat_hidden_weight)
        return q.eval()


def measured_row_traces(args, task: str, sens: Sensitivity) -> list[RowTrace] | None:
    """The word table's tier traces from ``--row-traces`` (``bench/qbert_probes.py TASK row-traces K``), or None."""
    if not args.row_traces:
        return None
    saved = json.loads(Path(args.row_traces.format(task=task)).read_text())
    if saved["tiers"] != args.row_tiers or saved["table_trace"] != sens[WORD].trace:
        raise SystemExit(f"{args.row_traces}: measured on {saved['tiers']} tiers of a table of trace "
                         f"{saved['table_trace']:.4g}; this run has {args.row_tiers} tiers and {sens[WORD].trace:.4g}")
    log(f"[{task}] the word table's {saved['tiers']} tier traces from {args.row_traces.format(task=task)}")
    return [RowTrace(torch.tensor(r["rows"]), r["trace"], r["stderr"], r["samples"]) for r in saved["traces"]]


def extra_scales(q) -> int:
    """Weight scales of ``q`` beyond one per output channel (negative where a grouping stores fewer)."""
    return sum(m.weight_quantizer.scale(m.weight.detach()).numel() - m.weight.shape[0] for m in q.modules()
               if isinstance(getattr(m, "weight_quantizer", None), torch.nn.Module)
               and isinstance(getattr(m, "weight", None), torch.Tensor))


def uniform(names: list[str], bits: int) -> dict[str, int]:
    return {n: bits for n in names}


def run_task(task: str, args, done: list[dict[str, Any]]) -> dict[str, Any]:
    t0 = time.time()
    t = Task(task, args)
    rows: list[dict[str, Any]] = []
    fp32 = t.accuracy(t.model)
    partial = {"task": task, "rows": rows, "fp32": fp32, "minutes": 0.0, "complete": False}

    def row(name: str, acc: float | None, size_mb: float | None, **extra) -> None:
        rows.append({"setting": name, "accuracy": acc, "size_mb": size_mb, **extra})
        partial["minutes"] = (time.time() - t0) / 60
        save(args, done + [partial])
        log(f"[{task}] {name}: {'-' if acc is None else f'{100 * acc:.2f}%'} "
            f"{'' if size_mb is None else f'{size_mb:.2f} MB'} {extra if extra else ''}")

    row("FP32", fp32, 4 * sum(p.numel() for p in t.model.parameters()) / 1e6)
    try:
        from _text import ort_dynamic_accuracy  # the ONNX Runtime baselines (bench/_text.py)

        acc, mb = ort_dynamic_accuracy(t.model, t.test)
        row("ONNX Runtime quantize_dynamic int8", acc, mb)
    except Exception as exc:  # noqa: BLE001 — a baseline that cannot run is reported, not fatal
        row("ONNX Runtime quantize_dynamic int8", None, None, error=f"{type(exc).__name__}: {exc}")

    w8 = uniform(t.layers, 8)
    q = t.quantize(w8)
    ptq = t.accuracy(q)
    qat = t.accuracy(t.qat(q)) if args.qat_steps and 8 in args.qat_uniform_bits else None
    row("hessq W8A8, 8-bit embeddings (16-bit residual stream)", ptq, t.size_mb(w8), after_qat=qat)

    for bits in args.uniform_bits:
        plan = uniform(t.layers, bits)
        for grouping, kw in ((g, GROUPINGS[g]) for g in args.groupings):
            q = t.quantize(plan, **kw)
            size = t.size_mb(plan, q)
            ptq = t.accuracy(q)
            qat = t.accuracy(t.qat(q)) if args.qat_steps and bits in args.qat_uniform_bits else None
            row(f"W{bits}A8 {grouping}", ptq, size, after_qat=qat)

    ts = time.time()
    if args.sensitivity:  # a saved analysis of this same checkpoint (it is refused for another model)
        log(f"[{task}] Hessian traces from {args.sensitivity.format(task=task)}")
        sens = Sensitivity.load(args.sensitivity.format(task=task))
        sens.check_model(t.model)
    else:
        log(f"[{task}] Hessian traces")
        sens = hessq.hessian_sensitivity(t.model, t.sens_batches, method=args.trace_method, rtol=args.rtol,
                                         max_samples=args.max_samples, time_budget=args.time_budget,
                                         eigenvalues=False, progress=True)
        sens.save(Path(args.out) / f"qbert_sensitivity_{task}.json")
    sens_seconds = time.time() - ts
    limit = evaluate_plan(t.model, uniform(t.layers, 3)).size_bytes
    # the word table in row tiers by lookups on the training split (every plan below: the same planner)
    usage = {WORD: lookup_counts(t.model, t.train)[WORD]} if args.row_tiers else None
    measured = measured_row_traces(args, task, sens) if usage else None

    def planned(s: Sensitivity):
        # measured tier traces, scaled by the table's trace in ``s`` (a reversed or random plan moves the
        # table's trace; its split among the tiers stays the measured one)
        traces = None if measured is None else {WORD: [
            replace(m, trace=m.trace * s[WORD].mean_trace / sens[WORD].mean_trace,
                    stderr=m.stderr * s[WORD].mean_trace / sens[WORD].mean_trace) for m in measured]}
        return plan_bits(t.model, s, weight_bits=MIXED_BITS, size_limit=limit, pin_first_last=None,
                         row_usage=usage, row_tiers=args.row_tiers or 1, row_traces=traces, curvature=args.curvature)

    mixed = planned(sens)
    seeds = [t.accuracy(t.qat(t.quantize(mixed), seed=s)) for s in range(args.seeds)]
    mean = float(np.mean(seeds))
    half = float(1.96 * np.std(seeds, ddof=1) / math.sqrt(len(seeds))) if len(seeds) > 1 else None
    row("Hessian mixed 2-8 bits (avg 3)", t.accuracy(t.quantize(mixed)), mixed.size_bytes / 1e6,
        after_qat=mean, qat_seeds=seeds, qat_ci95=half, average_bits=mixed.average_bits,
        bits={n: mixed[n] for n in mixed}, word_row_tiers=mixed.layers[WORD].get("row_tiers"),
        row_bits={n: {str(b): r for b, r in w.items()} for n, w in mixed.row_bits.items()})
    rev = planned(reverse_sensitivity(sens, magnitude=args.curvature == "magnitude"))
    q = t.quantize(rev)
    row("reversed sensitivity order", t.accuracy(q), rev.size_bytes / 1e6, after_qat=t.accuracy(t.qat(q)),
        average_bits=rev.average_bits)
    rand_ptq, rand_qat = [], []
    for seed in range(args.random_plans):
        rp = planned(random_sensitivity(sens, seed))
        q = t.quantize(rp)
        rand_ptq.append(t.accuracy(q))
        rand_qat.append(t.accuracy(t.qat(q)) if args.random_qat else None)
    row(f"random plans (median of {args.random_plans})", float(np.median(rand_ptq)), limit / 1e6,
        after_qat=float(np.median(rand_qat)) if args.random_qat else None, ptq_all=rand_ptq, qat_all=rand_qat)
    partial.update(minutes=(time.time() - t0) / 60, complete=True,
                   sensitivity={"seconds": sens_seconds, **{k: v for k, v in sens.meta.items() if k != "short_layers"}})
    save(args, done + [partial])
    return partial


def save(args, results: list[dict[str, Any]]) -> None:
    write_results(Path(args.out) / "qbert.json", {"command": command_line(), "machine": machine(), "results": results},
                  markdown(results, args))


def markdown(results: list[dict[str, Any]], args) -> str:
    out = ["# Q-BERT on all-MiniLM-L6-v2: BBC News and tweets", "",
           f"`{command_line()}` on {machine()}; QAT = {args.qat_steps} steps of hessq.finetune with distillation "
           f"from FP32{f' (and its hidden states, weight {args.qat_hidden_weight:g})' if args.qat_hidden_weight else ''}, "
           f"activation ranges {'as calibrated' if args.qat_ranges == 'frozen' else 'following each batch'}"
           + ("; plans on each trace's magnitude, |Tr(H)| + 2σ (curvature='magnitude')" if args.curvature == "magnitude" else "")
           + ". Accuracy: test split"
           + ("" if args.test_limit is None else f" (its first {-(-args.test_limit // 64) * 64} texts, in the split's order)")
           + ", hessq's fake-quantized model.", ""]
    for res in results:
        state = "" if res.get("complete") else ", **incomplete: the run was stopped**"
        out += [f"## {res['task']} (FP32 {100 * res['fp32']:.2f}%, {res['minutes']:.0f} min{state})", "",
                "| setting | size (MB) | post-training | after QAT |", "|---|---:|---:|---:|"]
        for r in res["rows"]:
            def pct(v):
                return "-" if v is None else f"{100 * v:.2f}"
            qat = pct(r.get("after_qat"))
            if r.get("qat_ci95") is not None:
                qat += f" ± {100 * r['qat_ci95']:.2f}"
            size = "-" if r["size_mb"] is None else f"{r['size_mb']:.2f}"
            out.append(f"| {r['setting']} | {size} | {pct(r['accuracy'])} | {qat} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--qat-steps", type=int, default=150)
    ap.add_argument("--qat-lr", type=float, default=2e-5, help="AdamW learning rate of QAT")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--qat-ranges", choices=("track", "frozen"), default="frozen",
                    help="activation ranges in QAT: follow each batch (EMA) or stay as calibrated")
    ap.add_argument("--qat-hidden-weight", type=float, default=0.0,
                    help="weight of hidden-state distillation in QAT (every LayerNorm's output; 0: logits only)")
    ap.add_argument("--qat-uniform-bits", type=int, nargs="*", default=[3],
                    help="uniform widths also trained with QAT (8: the W8A8 row)")
    ap.add_argument("--random-plans", type=int, default=5)
    ap.add_argument("--uniform-bits", type=int, nargs="*", default=[4, 3], help="uniform weight widths tabled")
    ap.add_argument("--groupings", nargs="*", default=list(GROUPINGS), choices=list(GROUPINGS),
                    help="weight groupings of the uniform rows")
    ap.add_argument("--random-qat", action="store_true", help="QAT every random plan too (slow)")
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--sensitivity-batches", type=int, default=2)
    ap.add_argument("--row-tiers", type=int, default=4,
                    help="the word table's row tiers by lookups in every plan (0: one width per table)")
    ap.add_argument("--row-traces", default=None,
                    help="the word table's tier traces measured by `bench/qbert_probes.py TASK row-traces K` (a "
                         "JSON; {task} is replaced): the plans take them instead of the table's trace shared by lookups")
    ap.add_argument("--curvature", choices=CURVATURES, default="signed",
                    help="how a negative trace enters the plans: signed (HAWQ) or magnitude (|trace|)")
    ap.add_argument("--sensitivity", default=None,
                    help="load the Hessian traces from this file ({task} is replaced) instead of computing them")
    ap.add_argument("--trace-method", default="hutchinson")
    ap.add_argument("--rtol", type=float, default=0.1)
    ap.add_argument("--max-samples", type=int, default=100)
    ap.add_argument("--time-budget", type=float, default=600)
    ap.add_argument("--test-limit", type=int, default=None, help="score on the first N test texts (rounded up to "
                                                                 "whole batches of 64)")
    ap.add_argument("--out", default=str(RESULTS))
    return run_tasks(run_task, ap.parse_args())


def run_tasks(run_one, args) -> int:
    """``run_one(task, args, done)`` for each of ``args.tasks`` in turn (seed 0), each seeing the results before it."""
    torch.manual_seed(0)
    results: list[dict[str, Any]] = []
    for task in args.tasks:
        results.append(run_one(task, args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
