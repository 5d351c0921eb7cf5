"""The Q-BERT table's Hessian traces to a stated precision: each layer's own estimator against the shared vector.

``bench/qbert.py`` planned on traces from the shared-vector Hutchinson estimator (``--trace-method hutchinson``: one
Rademacher vector over every layer per product, each layer reading its part), stopped by its time budget. Its
cross-block terms leave most layers' traces within noise of zero. This recomputes them on the same batches (the
first ``--sensitivity-batches`` of the unshuffled training split, as ``bench/qbert.py``) with ``--method`` (default
``auto``: the classifier's trace exact by Gauss-Newton, every other layer Hutchinson on its own block), and
tables both, layer by layer, with the time each took, and the plan each gives at the mixed row's size (average
3 bits, the word table in ``--row-tiers`` tiers), with the layers whose width changes. ``--score`` adds each
plan's post-training test accuracy.

    .venv/bin/python bench/qbert_traces.py --task bbc --time-budget 4200

Writes qbert_sensitivity_{task}_{method}.json (a Sensitivity file ``bench/qbert.py --sensitivity`` loads) and
qbert_traces_{task}.{json,md} to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hessq
from hessq.plan import evaluate_plan, lookup_counts, plan_bits
from hessq.sensitivity import Sensitivity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, log, machine, write_results  # noqa: E402
from qbert import MIXED_BITS, WORD, Task, uniform  # noqa: E402


def relative_stderr(trace: float, stderr: float) -> float:
    return abs(stderr / trace) if trace else float("inf")


def plan_for(t: Task, sens: Sensitivity, limit: int, usage: dict, tiers: int):
    return plan_bits(t.model, sens, weight_bits=MIXED_BITS, size_limit=limit, pin_first_last=None,
                     row_usage=usage, row_tiers=tiers)


def summary(sens: Sensitivity) -> dict[str, Any]:
    rel = [relative_stderr(r.trace, r.trace_stderr) for r in sens.values()]
    return {"median_relative_stderr": statistics.median(rel), "layers_within_10pct": sum(r <= 0.1 for r in rel),
            "layers_within_25pct": sum(r <= 0.25 for r in rel), "layers_over_50pct": sum(r > 0.5 for r in rel),
            "negative_traces": sum(r.trace < 0 for r in sens.values()), "layers": len(rel),
            # a file written by hessian_sensitivity alone has no seconds; stopped by its budget, it took that long
            "seconds": sens.meta.get("seconds") or (sens.meta.get("time_budget")
                                                    if sens.meta.get("stopped_by") == "time_budget" else None),
            "hvps": sens.meta.get("trace_hvps_per_rank"),
            "method": sens.meta.get("method"), "converged": sens.meta.get("converged")}


def equal_time(res: dict[str, Any]) -> dict[str, Any]:
    """The sampled layers' standard errors against the shared vector's at the same seconds (a mean of i.i.d. draws:
    its standard error scaled by √(its seconds / these seconds)); the ratio below 1 where these are more precise."""
    scale = (res["baseline"]["seconds"] / res["precise"]["seconds"]) ** 0.5
    ratios = [r["stderr"] / (r["old_stderr"] * scale) for r in res["layers"] if r["stderr"] > 0 and r["old_stderr"] > 0]
    return {"median_ratio": statistics.median(ratios), "more_precise": sum(x < 1 for x in ratios), "layers": len(ratios)}


def markdown(res: dict[str, Any]) -> str:
    old, new = res["baseline"], res["precise"]

    def head(s: dict[str, Any]) -> str:
        seconds = "?" if s["seconds"] is None else f"{s['seconds']:.0f} s"
        return (f"median relative standard error {100 * s['median_relative_stderr']:.0f}%; {s['layers_within_10pct']} "
                f"of {s['layers']} layers within 10%, {s['layers_within_25pct']} within 25%, {s['layers_over_50pct']} "
                f"over 50%; {s['negative_traces']} negative; {s['hvps']} products, {seconds}")

    lines = [f"# Hessian traces of the {res['task']} MiniLM: {new['method']} against the shared vector", "",
             f"`{res['command']}` on {res['machine']}; {res['articles']} training texts (the first "
             f"{res['batches']} batches of `bench/qbert.py`'s sensitivity data).", "",
             f"- shared vector (`{res['baseline_file']}`): {head(old)}",
             f"- {new['method']}: {head(new)}",
             *([] if res["equal_time"] is None else [
             f"- at equal time (the shared vector's standard errors scaled to {new['seconds']:.0f} s as a mean of "
             f"independent draws): {new['method']}'s are smaller on {res['equal_time']['more_precise']} of "
             f"{res['equal_time']['layers']} sampled layers, median ratio {res['equal_time']['median_ratio']:.2f}"]), "",
             f"Plans at the mixed row's size ({res['limit_mb']:.2f} MB, word table in {res['row_tiers']} row tiers): "
             f"{res['changed']} of {len(res['layers'])} layers change width."]
    if res.get("accuracy"):
        acc = res["accuracy"]
        lines.append(f"Post-training test accuracy: {100 * acc['baseline']:.2f} (shared-vector plan), "
                     f"{100 * acc['precise']:.2f} ({new['method']} plan).")
    lines += ["", "| layer | trace (shared) | rel. s.e. | trace (" + new["method"] + ") | rel. s.e. | estimator, draws "
              "| bits (shared) | bits (" + new["method"] + ") |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for row in res["layers"]:
        lines.append(f"| {row['name']} | {row['old_trace']:.3g} ± {row['old_stderr']:.2g} | "
                     f"{100 * row['old_rel']:.0f}% | {row['trace']:.3g} ± {row['stderr']:.2g} | {100 * row['rel']:.0f}% | "
                     f"{row['estimator']}, {row['samples']} | {row['old_bits']} | {row['bits']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bbc", choices=("bbc", "tweets"))
    ap.add_argument("--method", default="auto", help="hessian_sensitivity's method for the precise traces")
    ap.add_argument("--rtol", type=float, default=0.1)
    ap.add_argument("--max-samples", type=int, default=100)
    ap.add_argument("--time-budget", type=float, default=3600)
    ap.add_argument("--sensitivity-batches", type=int, default=2)
    ap.add_argument("--row-tiers", type=int, default=4)
    ap.add_argument("--baseline", default=str(RESULTS / "qbert_sensitivity_{task}.json"),
                    help="the shared-vector traces ({task} is replaced)")
    ap.add_argument("--score", action="store_true", help="each plan's post-training test accuracy")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    out = Path(args.out)
    t = Task(args.task, SimpleNamespace(calibration_batches=8, sensitivity_batches=args.sensitivity_batches,
                                        test_limit=None))
    baseline_file = args.baseline.format(task=args.task)
    old = Sensitivity.load(baseline_file)
    old.check_model(t.model)
    log(f"[{args.task}] traces by {args.method}, rtol {args.rtol}, at most {args.time_budget:.0f} s")
    t0 = time.time()
    new = hessq.hessian_sensitivity(t.model, t.sens_batches, method=args.method, rtol=args.rtol,
                                    max_samples=args.max_samples, time_budget=args.time_budget, eigenvalues=False,
                                    progress=True)
    new.meta["seconds"] = time.time() - t0
    new.save(out / f"qbert_sensitivity_{args.task}_{args.method}.json")

    limit = evaluate_plan(t.model, uniform(t.layers, 3)).size_bytes
    usage = {WORD: lookup_counts(t.model, t.train)[WORD]} if args.row_tiers else None
    plans = {"baseline": plan_for(t, old, limit, usage, args.row_tiers or 1),
             "precise": plan_for(t, new, limit, usage, args.row_tiers or 1)}
    layers = []
    for name in new:
        o, n = old[name], new[name]
        layers.append({"name": name, "old_trace": o.trace, "old_stderr": o.trace_stderr,
                       "old_rel": relative_stderr(o.trace, o.trace_stderr), "trace": n.trace, "stderr": n.trace_stderr,
                       "rel": relative_stderr(n.trace, n.trace_stderr), "estimator": n.extra.get("estimator"),
                       "samples": n.extra.get("samples"), "old_bits": plans["baseline"][name],
                       "bits": plans["precise"][name]})
    res: dict[str, Any] = {
        "command": command_line(), "machine": machine(), "task": args.task, "batches": args.sensitivity_batches,
        "articles": sum(len(b["labels"]) for b in t.sens_batches), "baseline_file": baseline_file,
        "baseline": summary(old), "precise": summary(new), "limit_mb": limit / 1e6, "row_tiers": args.row_tiers,
        "changed": sum(r["old_bits"] != r["bits"] for r in layers), "layers": layers,
        "plans": {k: {"bits": {n: p[n] for n in p}, "size_bytes": p.size_bytes,
                      "row_bits": {n: {str(b): r for b, r in w.items()} for n, w in p.row_bits.items()}}
                  for k, p in plans.items()}}
    res["equal_time"] = equal_time(res) if res["baseline"]["seconds"] else None
    if args.score:
        res["accuracy"] = {k: t.accuracy(t.quantize(p)) for k, p in plans.items()}
    write_results(out / f"qbert_traces_{args.task}.json", res, markdown(res))
    log(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
