"""Bench for bit allocation (issue 4).

1. ILP solve time: 1,000 layers × 6 bit choices × 3 limits (size, BOPs, latency), median of runs.
2. A 100-limit size–Ω Pareto frontier for the bundled ResNet-20.
3. The headline claim: on the bundled ResNet-20 and the Fashion-MNIST test set (10,000 images),
   post-training quantization (no fine-tuning), weights 2–8 bits, activations 8 bits, first and
   last layer at 8 bits, at average weight bits 3.5, 4 and 5: accuracy of the Hessian plan vs the
   uniform setting of nearest size, the reverse-sensitivity plan of the same size (mean traces
   reassigned in inverted rank order) and the median of 10 random plans of the same size (mean
   traces randomly permuted over the layers). All plans come from the same ILP under the same size
   limit; only the sensitivity given to it differs.

    .venv/bin/python bench/plan.py            # everything; writes bench/results/plan.{json,md}
    .venv/bin/python bench/plan.py --quick    # parts 1 and 2 only

The Hessian traces are cached in bench/results/plan_sensitivity.json (keyed by the checkpoint's
SHA-256) so that a rerun does not recompute them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hessq
from hessq._io import write_text_atomic
from hessq.graph import quantizable_layers
from hessq.plan import LatencyTable, evaluate_plan, pareto_frontier, plan_bits
from hessq.plan._plan import build_problem
from hessq.sensitivity import LayerSensitivity, Sensitivity, model_signature

RESULTS = Path(__file__).resolve().parent / "results"
BITS = tuple(range(2, 9))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
def checkpoint_sha() -> str:
    ref = resources.files("hessq.models").joinpath("resnet20_fashion_mnist.pt")
    return hashlib.sha256(ref.read_bytes()).hexdigest()


def own_hutchinson(model: nn.Module, batches, samples: int, seed: int) -> Sensitivity:
    """Fallback when hessq.hessian_sensitivity is unavailable: Tr(H_i) for every layer from shared Rademacher vectors."""
    layers = quantizable_layers(model)
    params = [m.weight for m in layers.values()]
    gen = torch.Generator().manual_seed(seed)
    per = torch.zeros(len(params), samples)
    total = sum(len(y) for _, y in batches)
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y) * (len(y) / total)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for s in range(samples):
            vs = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
            hv = torch.autograd.grad(grads, params, vs, retain_graph=True)
            per[:, s] += torch.stack([(h * v).sum() for h, v in zip(hv, vs)]).detach()
    recs = {}
    for i, (n, m) in enumerate(layers.items()):
        recs[n] = LayerSensitivity(float(per[i].mean()), float(per[i].std() / samples**0.5), None, m.weight.numel())
    return Sensitivity(recs, model_signature(model), {"method": "bench/plan.py own Hutchinson", "samples": samples})


def get_sensitivity(model: nn.Module, batches, args) -> tuple[Sensitivity, dict]:
    cache = Path(args.out).with_name("plan_sensitivity.json")
    sha = "untrained" if args.untrained else checkpoint_sha()
    if cache.exists() and not args.recompute_sensitivity:
        sens = Sensitivity.load(cache)
        if sens.meta.get("checkpoint_sha256") == sha:
            log(f"sensitivity: reusing {cache}")
            return sens, {"source": "cache", **sens.meta}
    t = time.perf_counter()
    fn = getattr(hessq, "hessian_sensitivity", None)
    if fn is not None:
        log("sensitivity: hessq.hessian_sensitivity")
        sens = fn(model, batches, nn.functional.cross_entropy, rtol=args.rtol, max_samples=args.max_samples,
                  seed=0, eigenvalues=False)
        method = "hessq.hessian_sensitivity"
    else:
        log("sensitivity: hessq.hessian_sensitivity not available; own Hutchinson loop")
        sens = own_hutchinson(model, batches, args.max_samples, seed=0)
        method = "own Hutchinson (bench)"
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


def reverse_sensitivity(sens: Sensitivity) -> Sensitivity:
    ranked = sorted(sens, key=lambda n: sens[n].mean_trace)
    values = [sens[n].mean_trace for n in ranked]
    return reassigned(sens, ranked, values[::-1], "inverted ranking")


def random_sensitivity(sens: Sensitivity, seed: int) -> Sensitivity:
    names = list(sens)
    rng = np.random.default_rng(seed)
    values = [sens[n].mean_trace for n in names]
    perm = rng.permutation(len(names))
    return reassigned(sens, names, [values[i] for i in perm], f"random permutation, seed {seed}")


# ----------------------------------------------------------------------------- 3. accuracy
class Evaluator:
    def __init__(self, model, calib, test) -> None:
        self.model, self.calib, self.test = model, calib, test
        self.cache: dict[tuple, float] = {}
        self.count = 0
        self.seconds = 0.0

    def __call__(self, plan) -> float:
        key = tuple(plan.items()) if not isinstance(plan, int) else ("uniform", plan)
        if key not in self.cache:
            t = time.perf_counter()
            qmodel = hessq.quantize(self.model, plan, self.calib)
            self.cache[key] = hessq.accuracy(qmodel, self.test)
            self.seconds += time.perf_counter() - t
            self.count += 1
        return self.cache[key]


def size_limit_for(model: nn.Module, avg_bits: float) -> float:
    """Bytes of a model whose weights average ``avg_bits`` bits (plus int32 biases and scales)."""
    eight = evaluate_plan(model, 8, input_shape=(1, 28, 28))
    overhead = sum(d["size_bytes"] - np.ceil(d["num_params"] * 8 / 8) for d in eight.layers.values())
    return float(overhead + sum(d["num_params"] for d in eight.layers.values()) * avg_bits / 8)


def headline(model, sens, args) -> dict:
    from hessq.data import fashion_mnist

    test = fashion_mnist("test", batch_size=1000, limit=args.test_limit)
    calib = fashion_mnist("train", batch_size=128, shuffle=True, seed=1).take(args.calib_batches)
    ev = Evaluator(model, calib, test)
    t = time.perf_counter()
    fp32 = hessq.accuracy(model, test)
    log(f"FP32 accuracy {fp32:.4f} ({time.perf_counter() - t:.1f} s)")
    names = list(quantizable_layers(model))
    edges = {names[0]: 8, names[-1]: 8}

    uniform = {}
    for b in BITS:
        bits = {n: edges.get(n, b) for n in names}
        p = evaluate_plan(model, bits, sens, input_shape=(1, 28, 28))
        acc = ev(b)  # quantize() keeps first/last at 8 for a uniform int, like `bits`
        uniform[b] = {"bits": b, "average_bits": p.average_bits, "size_bytes": p.size_bytes, "omega": p.omega,
                      "accuracy": acc}
        log(f"uniform W{b}A8: avg {p.average_bits:.3f} bits, acc {acc:.4f}")

    rev = reverse_sensitivity(sens)
    rands = [random_sensitivity(sens, seed) for seed in range(args.random_plans)]
    rows = []
    for target in args.targets:
        limit = size_limit_for(model, target)

        def plan_with(s):
            p = plan_bits(model, s, weight_bits=BITS, size_limit=limit, input_shape=(1, 28, 28))
            # Ω of every plan under the real Hessian sensitivity
            true = evaluate_plan(model, dict(p), sens, input_shape=(1, 28, 28))
            return p, true

        hp, htrue = plan_with(sens)
        h_acc = ev(hp)
        rp, rtrue = plan_with(rev)
        r_acc = ev(rp)
        rand = []
        for s in rands:
            p, true = plan_with(s)
            rand.append({"accuracy": ev(p), "average_bits": p.average_bits, "omega": true.omega, "bits": dict(p)})
        nearest = min(uniform.values(), key=lambda u: (abs(u["size_bytes"] - limit), u["bits"]))
        rand_accs = [r["accuracy"] for r in rand]
        row = {
            "target_average_bits": target,
            "size_limit_bytes": limit,
            "hessian": {"accuracy": h_acc, "average_bits": hp.average_bits, "size_bytes": hp.size_bytes,
                        "omega": htrue.omega, "bits": dict(hp), "solve_seconds": hp.meta["solve_seconds"]},
            "uniform_nearest": nearest,
            "reverse": {"accuracy": r_acc, "average_bits": rp.average_bits, "size_bytes": rp.size_bytes,
                        "omega": rtrue.omega, "bits": dict(rp)},
            "random": {"median_accuracy": statistics.median(rand_accs), "min_accuracy": min(rand_accs),
                       "max_accuracy": max(rand_accs), "accuracies": rand_accs,
                       "median_omega": statistics.median(r["omega"] for r in rand), "plans": rand},
        }
        row["hessian_beats_reverse"] = h_acc > r_acc
        row["hessian_beats_random_median"] = h_acc > row["random"]["median_accuracy"]
        row["hessian_vs_uniform_nearest"] = h_acc - nearest["accuracy"]
        rows.append(row)
        log(f"avg {target} bits: hessian {h_acc:.4f} ({hp.average_bits:.3f} b), uniform W{nearest['bits']} "
            f"{nearest['accuracy']:.4f}, reverse {r_acc:.4f}, random median {row['random']['median_accuracy']:.4f} "
            f"[{min(rand_accs):.4f}, {max(rand_accs):.4f}]")
    return {
        "fp32_accuracy": fp32,
        "test_images": len(test.targets),
        "calibration_images": sum(len(y) for _, y in calib),
        "weight_bits": list(BITS),
        "act_bits": 8,
        "pinned": edges,
        "uniform": list(uniform.values()),
        "targets": rows,
        "evaluations": ev.count,
        "evaluation_seconds": ev.seconds,
    }


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
                "reassigned in inverted rank order; random = mean traces randomly permuted (10 seeds). Ω is under the "
                "real Hessian traces.", "",
                "| avg bits | Hessian | uniform (nearest size) | reverse | random median [min, max] | Hessian > reverse | Hessian > random |",
                "|---:|---:|---:|---:|---:|:---:|:---:|"]
        for r in h["targets"]:
            u = r["uniform_nearest"]
            rd = r["random"]
            out.append(
                f"| {r['target_average_bits']} | **{r['hessian']['accuracy'] * 100:.2f}%** ({r['hessian']['average_bits']:.3f} b, "
                f"Ω {r['hessian']['omega']:.3g}) | {u['accuracy'] * 100:.2f}% (W{u['bits']}, {u['average_bits']:.3f} b) | "
                f"{r['reverse']['accuracy'] * 100:.2f}% ({r['reverse']['average_bits']:.3f} b, Ω {r['reverse']['omega']:.3g}) | "
                f"{rd['median_accuracy'] * 100:.2f}% [{rd['min_accuracy'] * 100:.2f}, {rd['max_accuracy'] * 100:.2f}] "
                f"(Ω {rd['median_omega']:.3g}) | {'yes' if r['hessian_beats_reverse'] else 'no'} | "
                f"{'yes' if r['hessian_beats_random_median'] else 'no'} |")
        out += ["", "Uniform settings (first/last layer 8 bits):", "", "| weights | avg bits | size (B) | Ω | accuracy |",
                "|---:|---:|---:|---:|---:|"]
        for u in h["uniform"]:
            out.append(f"| W{u['bits']}A8 | {u['average_bits']:.3f} | {u['size_bytes']:,.0f} | {u['omega']:.3g} | "
                       f"{u['accuracy'] * 100:.2f}% |")
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
    ap.add_argument("--max-samples", type=int, default=64)
    ap.add_argument("--rtol", type=float, default=0.05)
    ap.add_argument("--recompute-sensitivity", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "plan.json"))
    ap.add_argument("--test-limit", type=int, default=None, help="smoke runs only: evaluate on fewer test images")
    ap.add_argument("--untrained", action="store_true", help="smoke runs only: random weights, no checkpoint")
    args = ap.parse_args()
    torch.manual_seed(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    res = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                   f"python {platform.python_version()}",
        "command": " ".join([".venv/bin/python", "bench/plan.py", *sys.argv[1:]]),
        "commit": commit,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    log("1. ILP solve time")
    res["solve"] = bench_solve(runs=args.runs)
    log(f"   median {res['solve']['solve_median_seconds']:.3f} s")

    from hessq.data import fashion_mnist
    from hessq.models import resnet20

    model = resnet20(pretrained=not args.untrained)
    sens_batches = fashion_mnist("train", batch_size=128, shuffle=True, seed=2).take(args.sens_batches)
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
    if not args.quick:
        log("3. Hessian plan vs uniform / reverse / random (PTQ, 10k test images)")
        res["headline"] = headline(model, sens, args)
    out = Path(args.out)
    write_text_atomic(out, json.dumps(res, indent=2))
    write_text_atomic(out.with_suffix(".md"), markdown(res))
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
