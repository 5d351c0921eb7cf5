"""Bench for bit allocation (issue 4).

1. ILP solve time: 1,000 layers × 6 bit choices × 3 limits (size, BOPs, latency), median of runs.
2. A 100-limit size–Ω Pareto frontier for the bundled ResNet-20.
3. The headline claim: on the bundled ResNet-20 and the Fashion-MNIST test set (10,000 images),
   post-training quantization (no fine-tuning), weights 2–8 bits, activations 8 bits, first and
   last layer at 8 bits, at average weight bits 3.5, 4 and 5: accuracy of the Hessian plan vs the
   uniform setting of nearest size, the reverse-sensitivity plan of the same size (mean traces
   reassigned in inverted rank order) and the median of 10 random plans of the same size (mean
   traces randomly permuted over the layers). All plans come from the same ILP under the same size
   limit; only the sensitivity given to it differs. Each plan is quantized by ``hessq.quantize``
   (calibrated on 512 training images) and scored by ``hessq.accuracy`` in the quantized model's
   eval mode, which computes what the integer model computes.

    .venv/bin/python bench/plan.py            # everything; writes bench/results/plan.{json,md}
    .venv/bin/python bench/plan.py --quick    # parts 1 and 2 only

The Hessian traces are cached in bench/results/plan_sensitivity.json (keyed by the checkpoint's
SHA-256) so that a rerun does not recompute them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hessq
from hessq.graph import quantizable_layers
from hessq.plan import LatencyTable, evaluate_plan, pareto_frontier, plan_bits
from hessq.plan._plan import build_problem
from hessq.sensitivity import LayerSensitivity, Sensitivity, model_signature

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, cached_sensitivity, checkpoint_sha, command_line, git_commit, log, machine,  # noqa: E402
                     write_results)

BITS = tuple(range(2, 9))
#: How every plan's post-training accuracy is measured (the "ptq" entry of the results).
PTQ = "hessq.quantize + hessq.accuracy (the quantized model's eval mode: integer arithmetic)"


# ----------------------------------------------------------------------------- 1. solve time
def chain_model(num_layers: int, rng: np.random.Generator) -> nn.Module:
    widths = rng.integers(8, 65, num_layers + 1).tolist()
    return nn.Sequential(*[nn.Linear(widths[i], widths[i + 1]) for i in range(num_layers)])


def bench_solve(num_layers: int = 1000, runs: int = 7, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = chain_model(num_layers, rng).eval()
    layers = quantizable_layers(model)
    sens = Sensitivity(
        {n: LayerSensitivity(float(10 ** rng.uniform(-3, 1)) * m.weight.numel(), 0.0, None, m.weight.numel())
         for n, m in layers.items()},
        model_signature(model),
    )
    bits = (2, 3, 4, 5, 6, 8)
    latency = LatencyTable({
        n: {b: float(m.weight.numel() * (0.3 + b / 8) * 1e-9 * rng.uniform(0.9, 1.1)) for b in bits}
        for n, m in layers.items()
    })
    t0 = time.perf_counter()
    problem = build_problem(model, sens, weight_bits=bits, latency_table=latency, input_shape=(model[0].in_features,),
                            pin_first_last=None)
    setup = time.perf_counter() - t0
    limits = problem.resolve_limits("50%", "60%", "55%")
    times, plans = [], []
    for _ in range(runs):
        t = time.perf_counter()
        plans.append(problem.solve(limits))
        times.append(time.perf_counter() - t)
    assert all(p == plans[0] for p in plans), "the ILP is not deterministic"
    # the same through the public entry point, once (includes Ω and the cost model)
    t = time.perf_counter()
    full = plan_bits(model, sens, weight_bits=bits, size_limit="50%", bops_limit="60%", latency_limit="55%",
                     latency_table=latency, input_shape=(model[0].in_features,), pin_first_last=None)
    end_to_end = time.perf_counter() - t
    assert full == plans[0]
    return {
        "layers": num_layers,
        "bit_choices": list(bits),
        "limits": {k: v for k, v in limits.items()},
        "binary_variables": num_layers * len(bits),
        "runs": runs,
        "solve_seconds": times,
        "solve_median_seconds": statistics.median(times),
        "setup_seconds": setup,
        "plan_bits_end_to_end_seconds": end_to_end,
        "status": plans[0].meta["status"],
        "goal_seconds": 1.0,
        "meets_goal": statistics.median(times) < 1.0,
    }


# ----------------------------------------------------------------------------- sensitivity
def get_sensitivity(model: nn.Module, batches, args) -> tuple[Sensitivity, dict]:
    cache = Path(args.out).with_name("plan_sensitivity.json")
    sha = "untrained" if args.untrained else checkpoint_sha()
    sens = None if args.recompute_sensitivity else cached_sensitivity(cache, sha)
    if sens is not None:
        log(f"sensitivity: reusing {cache}")
        return sens, {"source": "cache", **sens.meta}
    t = time.perf_counter()
    log("sensitivity: hessq.hessian_sensitivity")
    sens = hessq.hessian_sensitivity(model, batches, nn.functional.cross_entropy, rtol=args.rtol,
                                     max_samples=args.max_samples, seed=0, eigenvalues=False)
    method = "hessq.hessian_sensitivity"
    seconds = time.perf_counter() - t
    meta = dict(sens.meta)
    meta.update({"checkpoint_sha256": sha, "method": method, "seconds": seconds,
                 "batches": len(batches), "images": sum(len(y) for _, y in batches)})
    sens = Sensitivity(dict(sens), sens.signature or model_signature(model), meta)
    sens.save(cache)
    return sens, {"source": "computed", **meta}


def reassigned(sens: Sensitivity, order: list[str], values: list[float], how: str) -> Sensitivity:
    """A sensitivity whose mean traces are ``values`` given to the layers in ``order``."""
    recs = {}
    for name, mt in zip(order, values):
        n = sens[name].num_params
        recs[name] = LayerSensitivity(mt * n, 0.0, None, n)
    return Sensitivity({k: recs[k] for k in sens}, sens.signature, {"made_by": how})


def reverse_sensitivity(sens: Sensitivity, magnitude: bool = False) -> Sensitivity:
    """The ranking inverted: of the signed mean traces, or of their magnitudes (for a planner on |Tr|)."""
    key = (lambda n: abs(sens[n].mean_trace)) if magnitude else (lambda n: sens[n].mean_trace)
    ranked = sorted(sens, key=key)
    values = [key(n) for n in ranked]
    return reassigned(sens, ranked, values[::-1], "inverted ranking" + (" of |trace|" if magnitude else ""))


def random_sensitivity(sens: Sensitivity, seed: int) -> Sensitivity:
    names = list(sens)
    rng = np.random.default_rng(seed)
    values = [sens[n].mean_trace for n in names]
    perm = rng.permutation(len(names))
    return reassigned(sens, names, [values[i] for i in perm], f"random permutation, seed {seed}")


# ----------------------------------------------------------------------------- 3. accuracy
class Evaluator:
    """Post-training accuracy of a plan (weights per channel, activations 8 bits) by hessq itself, cached per plan."""

    def __init__(self, model, calib, test) -> None:
        self.model, self.calib, self.test = model, calib, test
        self.names = list(quantizable_layers(model))
        self.cache: dict[tuple, float] = {}
        self.count = 0
        self.seconds = 0.0

    def __call__(self, plan) -> float:
        if isinstance(plan, int):  # uniform: first and last layer at 8 bits, as hessq.quantize does
            plan = {n: 8 if n in (self.names[0], self.names[-1]) else plan for n in self.names}
        key = tuple(plan.items())
        if key not in self.cache:
            t = time.perf_counter()
            self.cache[key] = hessq.accuracy(hessq.quantize(self.model, dict(plan), self.calib), self.test)
            self.seconds += time.perf_counter() - t
            self.count += 1
        return self.cache[key]


def size_limit_for(model: nn.Module, avg_bits: float) -> float:
    """Bytes of a model whose weights average ``avg_bits`` bits (plus int32 biases and scales)."""
    eight = evaluate_plan(model, 8, input_shape=(1, 28, 28))
    overhead = sum(d["size_bytes"] - np.ceil(d["num_params"] * 8 / 8) for d in eight.layers.values())
    return float(overhead + sum(d["num_params"] for d in eight.layers.values()) * avg_bits / 8)


def headline(model, sens, args, partial=None) -> dict:
    from hessq.data import fashion_mnist

    test = fashion_mnist("test", batch_size=1000, limit=args.test_limit)
    calib = fashion_mnist("train", batch_size=128, shuffle=True, seed=1).take(args.calib_batches)
    ev = Evaluator(model, calib, test)
    t = time.perf_counter()
    fp32 = hessq.accuracy(model, test)
    log(f"FP32 accuracy {fp32:.4f} ({time.perf_counter() - t:.1f} s)")
    names = list(quantizable_layers(model))
    edges = {names[0]: 8, names[-1]: 8}
    deadline = time.time() + args.budget_minutes * 60 if args.budget_minutes else None

    uniform = {}
    for b in BITS:
        bits = {n: edges.get(n, b) for n in names}
        p = evaluate_plan(model, bits, sens, input_shape=(1, 28, 28))
        uniform[b] = {"bits": b, "average_bits": p.average_bits, "size_bytes": p.size_bytes, "omega": p.omega,
                      "accuracy": None}

    rev = reverse_sensitivity(sens)
    rands = [random_sensitivity(sens, seed) for seed in range(args.random_plans)]
    rows = []
    jobs = []  # (row, key, plan) in priority order: every target's main comparison first, then random plans
    for target in args.targets:
        limit = size_limit_for(model, target)

        def plan_with(s):
            p = plan_bits(model, s, weight_bits=BITS, size_limit=limit, input_shape=(1, 28, 28))
            true = evaluate_plan(model, dict(p), sens, input_shape=(1, 28, 28))  # Ω under the real traces
            return {"accuracy": None, "average_bits": p.average_bits, "size_bytes": p.size_bytes,
                    "omega": true.omega, "bits": dict(p), "solve_seconds": p.meta["solve_seconds"]}

        nearest = min(uniform.values(), key=lambda u: (abs(u["size_bytes"] - limit), u["bits"]))
        row = {"target_average_bits": target, "size_limit_bytes": limit, "hessian": plan_with(sens),
               "uniform_nearest": nearest, "reverse": plan_with(rev),
               "random": {"plans": [plan_with(s) for s in rands]}}
        rows.append(row)
        jobs += [(row["hessian"], row["hessian"]["bits"]), (row["reverse"], row["reverse"]["bits"]),
                 (nearest, nearest["bits"])]
    for i in range(args.random_plans):
        for row in rows:
            r = row["random"]["plans"][i]
            jobs.append((r, r["bits"]))

    def summarise(stopped: bool) -> dict:
        for row in rows:
            accs = [r["accuracy"] for r in row["random"]["plans"] if r["accuracy"] is not None]
            rd = row["random"]
            rd["evaluated"] = len(accs)
            rd["accuracies"] = accs
            rd["median_accuracy"] = statistics.median(accs) if accs else None
            rd["min_accuracy"] = min(accs) if accs else None
            rd["max_accuracy"] = max(accs) if accs else None
            rd["median_omega"] = statistics.median(r["omega"] for r in rd["plans"])
            h, rv = row["hessian"]["accuracy"], row["reverse"]["accuracy"]
            row["hessian_beats_reverse"] = None if h is None or rv is None else h > rv
            row["hessian_beats_random_median"] = None if h is None or not accs else h > rd["median_accuracy"]
            u = row["uniform_nearest"]["accuracy"]
            row["hessian_vs_uniform_nearest"] = None if h is None or u is None else h - u
        return {
            "fp32_accuracy": fp32, "test_images": len(test.targets),
            "calibration_images": sum(len(y) for _, y in calib), "ptq": PTQ,
            "weight_bits": list(BITS), "act_bits": 8, "pinned": edges,
            "uniform": list(uniform.values()), "targets": rows, "evaluations": ev.count,
            "evaluation_seconds": ev.seconds, "stopped_by_budget": stopped,
        }

    stopped = False
    for k, (slot, plan) in enumerate(jobs):
        if deadline is not None and time.time() > deadline:
            stopped = True
            log(f"time budget spent: {len(jobs) - k} of {len(jobs)} evaluations not run")
            break
        slot["accuracy"] = ev(plan)
        log(f"eval {k + 1}/{len(jobs)}: acc {slot['accuracy']:.4f} (avg {slot['average_bits']:.3f} b)")
        if partial is not None:
            partial(summarise(False))
    return summarise(stopped)


# ----------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    out = ["# Bit allocation (issue 4)", ""]
    out.append(f"Machine: {res['machine']}. Command: `{res['command']}`. Commit {res['commit']}.")
    out.append("")
    s = res.get("solve")
    if s:
        out += ["## ILP solve time", "",
                f"{s['layers']:,} layers × {len(s['bit_choices'])} bit choices ({s['binary_variables']:,} binary "
                f"variables) × 3 limits (size 50%, BOPs 60%, latency 55%), scipy.optimize.milp (HiGHS), "
                f"status {s['status']}.", "",
                "| | seconds |", "|---|---:|",
                f"| solve, median of {s['runs']} | {s['solve_median_seconds']:.3f} |",
                f"| solve, min / max | {min(s['solve_seconds']):.3f} / {max(s['solve_seconds']):.3f} |",
                f"| setup (Ω, costs, ties), once | {s['setup_seconds']:.2f} |",
                f"| plan_bits end to end, once | {s['plan_bits_end_to_end_seconds']:.2f} |", "",
                f"Goal < 1 s median: {'met' if s['meets_goal'] else 'NOT met'}.", ""]
    p = res.get("pareto")
    if p:
        out += ["## Pareto frontier, ResNet-20", "",
                f"{p['num_limits']} size limits evenly spaced over {p['size_range'][0]:,.0f}–{p['size_range'][1]:,.0f} "
                f"bytes gave {p['points']} distinct non-dominated plans in {p['seconds']:.2f} s "
                f"({p['seconds'] / p['num_limits'] * 1000:.1f} ms per ILP).", "",
                "| avg bits | size (B) | Ω |", "|---:|---:|---:|"]
        pts = p["frontier"]
        step = max(1, len(pts) // 10)
        for q in pts[::step] + ([pts[-1]] if (len(pts) - 1) % step else []):
            out.append(f"| {q['average_bits']:.3f} | {q['size_bytes']:,.0f} | {q['omega']:.4g} |")
        out.append("")
    h = res.get("headline")
    if h:
        out += ["## Hessian plan vs baselines, ResNet-20 / Fashion-MNIST, PTQ", "",
                f"FP32 accuracy {h['fp32_accuracy'] * 100:.2f}% on {h['test_images']:,} test images. Weights 2–8 bits "
                f"per channel, activations 8 bits, first/last layer 8 bits, calibration on {h['calibration_images']} "
                "training images, no fine-tuning. Same ILP and size limit for every mixed plan; reverse = mean traces "
                "reassigned in inverted rank order; random = mean traces randomly permuted (one seed per plan). "
                f"PTQ engine: {h.get('ptq')}. Ω is under the real Hessian traces.", "",
                "| avg bits | Hessian | uniform (nearest size) | reverse | random median [min, max] | Hessian > reverse | Hessian > random |",
                "|---:|---:|---:|---:|---:|:---:|:---:|"]
        def pct(v):
            return "–" if v is None else f"{v * 100:.2f}%"

        def yn(v):
            return "–" if v is None else ("yes" if v else "no")

        for r in h["targets"]:
            u = r["uniform_nearest"]
            rd = r["random"]
            rand = "–" if rd["median_accuracy"] is None else (
                f"{pct(rd['median_accuracy'])} [{pct(rd['min_accuracy'])}, {pct(rd['max_accuracy'])}], n={rd['evaluated']}")
            out.append(
                f"| {r['target_average_bits']} | **{pct(r['hessian']['accuracy'])}** ({r['hessian']['average_bits']:.3f} b, "
                f"Ω {r['hessian']['omega']:.3g}) | {pct(u['accuracy'])} (W{u['bits']}, {u['average_bits']:.3f} b) | "
                f"{pct(r['reverse']['accuracy'])} ({r['reverse']['average_bits']:.3f} b, Ω {r['reverse']['omega']:.3g}) | "
                f"{rand} (Ω {rd['median_omega']:.3g}) | {yn(r['hessian_beats_reverse'])} | "
                f"{yn(r['hessian_beats_random_median'])} |")
        if h.get("stopped_by_budget"):
            out += ["", "**The time budget ran out before every evaluation was run; n = random plans evaluated.**"]
        out += ["", "Uniform settings (first/last layer 8 bits):", "", "| weights | avg bits | size (B) | Ω | accuracy |",
                "|---:|---:|---:|---:|---:|"]
        for u in h["uniform"]:
            acc = "not evaluated" if u["accuracy"] is None else f"{u['accuracy'] * 100:.2f}%"
            out.append(f"| W{u['bits']}A8 | {u['average_bits']:.3f} | {u['size_bytes']:,.0f} | {u['omega']:.3g} | {acc} |")
        out += ["", "Bits per layer of the Hessian plans:", "",
                "| layer | " + " | ".join(f"{r['target_average_bits']} b" for r in h["targets"]) + " |",
                "|---|" + "---:|" * len(h["targets"])]
        for name in h["targets"][0]["hessian"]["bits"]:
            out.append(f"| {name} | " + " | ".join(str(r["hessian"]["bits"][name]) for r in h["targets"]) + " |")
        sens = res.get("sensitivity", {})
        out += ["", f"Sensitivity: {sens.get('method')} ({sens.get('source')}), {sens.get('images')} training images, "
                f"{sens.get('seconds', 0):.0f} s when computed. {h['evaluations']} PTQ evaluations took "
                f"{h['evaluation_seconds']:.0f} s."]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="solve time and Pareto frontier only")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--targets", type=float, nargs="+", default=[3.5, 4.0, 5.0])
    ap.add_argument("--random-plans", type=int, default=10)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--sens-batches", type=int, default=2)
    ap.add_argument("--max-samples", type=int, default=40)
    ap.add_argument("--rtol", type=float, default=0.1)
    ap.add_argument("--recompute-sensitivity", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "plan.json"))
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="stop starting PTQ evaluations after this many minutes (random plans are evaluated last)")
    ap.add_argument("--sens-batch-size", type=int, default=100)
    ap.add_argument("--test-limit", type=int, default=None, help="smoke runs only: evaluate on fewer test images")
    ap.add_argument("--untrained", action="store_true", help="smoke runs only: random weights, no checkpoint")
    args = ap.parse_args()
    torch.manual_seed(0)
    res = {
        "machine": f"{machine()}, torch {torch.__version__}, python {platform.python_version()}",
        "command": command_line(),
        "commit": git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    log("1. ILP solve time")
    res["solve"] = bench_solve(runs=args.runs)
    log(f"   median {res['solve']['solve_median_seconds']:.3f} s")

    from hessq.data import fashion_mnist
    from hessq.models import resnet20

    model = resnet20(pretrained=not args.untrained)
    sens_batches = fashion_mnist("train", batch_size=args.sens_batch_size, shuffle=True, seed=2).take(args.sens_batches)
    sens, info = get_sensitivity(model, sens_batches, args)
    res["sensitivity"] = info
    res["sensitivity"]["mean_trace"] = {n: sens[n].mean_trace for n in sens}

    log("2. Pareto frontier")
    front = pareto_frontier(model, sens, weight_bits=BITS, num_points=100, input_shape=(1, 28, 28))
    res["pareto"] = {
        "num_limits": 100, "points": len(front), "seconds": front.meta["seconds"],
        "size_range": front.meta["size_range"],
        "frontier": [{"size_bytes": p.size_bytes, "omega": p.omega, "average_bits": p.plan.average_bits,
                      "bits": list(p.plan.values())} for p in front],
    }
    log(f"   {len(front)} points in {front.meta['seconds']:.2f} s")
    out = Path(args.out)
    if not args.quick:
        log("3. Hessian plan vs uniform / reverse / random (PTQ, 10k test images)")
        def partial(h):
            write_results(out.with_suffix(".partial.json"), {**res, "headline": h}, markdown({**res, "headline": h}))

        res["headline"] = headline(model, sens, args, partial)
    write_results(out, res, markdown(res))
    for partial_file in (out.with_suffix(".partial.json"), out.with_suffix(".partial.md")):
        partial_file.unlink(missing_ok=True)  # the finished results replace the progress files
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
