"""Bench for the Hessian sensitivity engine (issue 15): time to every layer's trace at a stated precision.

Side by side in one run, at --threads threads, on one batch of --batch-size Fashion-MNIST training images:

1. ResNet-20 (bundled checkpoint; piecewise linear): time until every one of its 22 layers' traces has
   relative standard error ≤ --rtol (or is exact), for
   * hessq.hessian_sensitivity (method "auto": exact Gauss-Newton traces, plain backward passes),
     median of --repeats;
   * (a) PyHessian per layer, as HAWQ users run it: freeze the other parameters, build ``hessian``,
     call its ``trace(maxIter=1)`` once per sample until the layer's relative standard error is
     ≤ --rtol (after 10 samples, hessq's min_samples). A layer still short after --pyhessian-cap
     samples is extrapolated: setup + its time per sample × the samples its standard error says it
     needs, n·(se/(rtol·|mean|))²; the table says how many layers were;
   * (b) PyHessian's whole-model trace (every parameter) at 50 samples, the figure the issue names.
   Every hessq trace is also compared with PyHessian's per-layer mean (in combined standard errors).
2. A small SiLU network (random init, seed 0; not piecewise linear): hessq auto (restricted HVPs,
   exact where cheaper; the output layer by Gauss-Newton) against PyHessian per layer, same rule,
   and hessq's shared-vector Hutchinson (the former engine) to the same precision.

PyHessian is pip-installed for this benchmark only (``pip install pyhessian``); it is not a hessq
dependency. Writes bench/results/hessian.json and bench/results/hessian.md.

    PYTHONPATH=src .venv/bin/python bench/hessian.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessq._io import write_text_atomic
from hessq.data import fashion_mnist
from hessq.graph import quantizable_layers
from hessq.models import resnet20
from hessq.sensitivity import hessian_sensitivity

RESULTS = Path(__file__).resolve().parent / "results"
MIN_SAMPLES = 10


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def silu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def hessq_auto(model, x, y, rtol, repeats):
    times, sens = [], None
    for _ in range(repeats):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, sens = _timed(lambda: hessian_sensitivity(model, (x, y), rtol=rtol, max_samples=1000, eigenvalues=False, seed=0))
        times.append(t)
        print(f"  hessq auto {t:.1f} s", flush=True)
    return {"median_s": statistics.median(times), "raw_s": times, "converged": sens.meta["converged"],
            "estimators": sens.meta["estimators"], "backward_passes": sens.meta["backward_passes_per_rank"],
            "hvps": sens.meta["trace_hvps_per_rank"],
            "traces": {n: [r.trace, r.trace_stderr, r.extra["estimator"], r.extra["samples"]] for n, r in sens.items()}}


def pyhessian_per_layer(model, x, y, rtol, cap):
    """PyHessian's own trace(), one sample per call, per layer, until rel. stderr ≤ rtol (or ``cap``, then extrapolated)."""
    from pyhessian import hessian as PyHessian

    out, total, extrapolated = {}, 0.0, 0
    for name, mod in quantizable_layers(model).items():
        for p in model.parameters():
            p.requires_grad_(False); p.grad = None
        mod.weight.requires_grad_(True)
        t_setup, h = _timed(lambda: PyHessian(model, F.cross_entropy, data=(x, y), cuda=False))
        vals, t_samples = [], 0.0
        while True:
            t, v = _timed(lambda: h.trace(maxIter=1, tol=float("-inf")))
            vals += v
            t_samples += t
            m, se = float(np.mean(vals)), float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else math.inf
            if len(vals) >= MIN_SAMPLES and se <= rtol * abs(m):
                need, s = len(vals), t_setup + t_samples
                break
            if len(vals) >= cap:
                need = max(len(vals), math.ceil(len(vals) * (se / (rtol * abs(m))) ** 2))
                s = t_setup + t_samples / len(vals) * need
                extrapolated += 1
                break
        del h
        out[name] = {"setup_s": t_setup, "samples_run": len(vals), "samples_needed": need, "seconds": s, "mean": m, "stderr": se}
        total += s
        print(f"  PyHessian {name}: {len(vals)} run, {need} needed, {s:.1f} s", flush=True)
    for p in model.parameters():
        p.requires_grad_(True); p.grad = None
    return {"seconds": total, "layers_extrapolated": extrapolated, "cap": cap, "layers": out}


def pyhessian_whole(model, x, y, samples):
    from pyhessian import hessian as PyHessian

    t_setup, h = _timed(lambda: PyHessian(model, F.cross_entropy, data=(x, y), cuda=False))
    t, vals = _timed(lambda: h.trace(maxIter=samples, tol=float("-inf")))
    del h
    for p in model.parameters():
        p.grad = None
    return {"seconds": t_setup + t, "samples": len(vals), "trace": float(np.mean(vals)),
            "stderr": float(np.std(vals, ddof=1) / math.sqrt(len(vals)))}


def agreement(hq: dict, ph: dict) -> dict:
    """|hessq − PyHessian| per layer in combined standard errors."""
    z = {n: abs(hq[n][0] - r["mean"]) / max(math.hypot(hq[n][1], r["stderr"]), 1e-300) for n, r in ph["layers"].items()}
    return {"max_z": max(z.values()), "within_3": sum(v <= 3 for v in z.values()), "layers": len(z), "z": z}


def reached(ph: dict, layers: int) -> str:
    n = ph["layers_extrapolated"]
    return "yes" if n == 0 else f"{layers - n} run to it, {n} extrapolated"


def render(res: dict) -> str:
    cfg, r, s = res["config"], res["resnet20"], res["silu"]
    ra, rp, rw = r["hessq"], r["pyhessian_per_layer"], r["pyhessian_whole_50"]
    sa, sp, sh = s["hessq"], s["pyhessian_per_layer"], s["hessq_shared"]
    noisiest = max(sh["rel_stderr"], key=sh["rel_stderr"].get)
    goal_a = ra["median_s"] <= rp["seconds"] / 10
    goal_b = ra["median_s"] < rw["seconds"]
    return f"""# Per-layer Hessian traces at a stated precision (bench/hessian.py)

`{cfg.get('command_resnet20') or cfg['command']}` (ResNet-20){'' if cfg['command'] == cfg.get('command_resnet20') else f"; `{cfg['command']}` (SiLU network, a second run)"}

One batch of {cfg['batch_size']} Fashion-MNIST training images, CPU ({cfg['machine']}), torch {cfg['torch']},
{cfg['threads']} threads; each model's methods side by side in one run. The machine (2 cores) was shared with
three other developers' jobs while it ran (load average about 5): absolute times are noisy and several times
what an idle machine gives; ratios are from the same run.
Target: every layer's trace at relative standard error ≤ {cfg['rtol']:.0%}, or exact.

## ResNet-20 (bundled checkpoint, piecewise linear, {r['layers']} layers)

| method | time (s) | every layer ≤ {cfg['rtol']:.0%} | ratio to hessq |
|---|---:|---|---:|
| hessq `hessian_sensitivity` (auto: {', '.join(f'{v} {k}' for k, v in ra['estimators'].items())}; {ra['backward_passes']} backward passes, {ra['hvps']} HVPs), median of {len(ra['raw_s'])} | {ra['median_s']:.1f} | {'yes' if ra['converged'] else 'NO'} (exact) | 1 |
| (a) PyHessian per layer, sampled to {cfg['rtol']:.0%} ¹ | {rp['seconds']:.1f} | {reached(rp, r['layers'])} | {rp['seconds'] / ra['median_s']:.1f}× |
| (b) PyHessian whole-model trace, {rw['samples']} samples (one number, {rw['trace']:.1f} ± {rw['stderr']:.1f}) | {rw['seconds']:.1f} | — | {rw['seconds'] / ra['median_s']:.1f}× |

Goals: (a) at most 1/10 of PyHessian per layer: **{'met' if goal_a else 'MISSED'}** ({ra['median_s']:.1f} s vs {rp['seconds'] / 10:.1f} s);
(b) less than one PyHessian whole-model trace at 50 samples: **{'met' if goal_b else 'MISSED'}** ({ra['median_s']:.1f} s vs {rw['seconds']:.1f} s).
hessq's exact traces against PyHessian's per-layer means: {r['agreement']['within_3']} of {r['agreement']['layers']} layers within 3 combined
standard errors (largest {r['agreement']['max_z']:.2f}).

## Small SiLU network (random init, seed 0; {s['layers']} layers, not piecewise linear)

| method | time (s) | every layer ≤ {cfg['rtol']:.0%} | ratio to hessq |
|---|---:|---|---:|
| hessq auto ({', '.join(f'{v} {k}' for k, v in sa['estimators'].items())}), median of {len(sa['raw_s'])} | {sa['median_s']:.1f} | {'yes' if sa['converged'] else 'NO'} | 1 |
| PyHessian per layer, sampled to {cfg['rtol']:.0%} ¹ | {sp['seconds']:.1f} | {reached(sp, s['layers'])} | {sp['seconds'] / sa['median_s']:.1f}× |
| hessq shared-vector Hutchinson (the former engine) ² | {sh['seconds']:.1f} | {'yes' if sh['converged'] else f"needs {sh['samples_needed']} samples"} | {sh['seconds'] / sa['median_s']:.1f}× |

hessq against PyHessian per layer: {s['agreement']['within_3']} of {s['agreement']['layers']} layers within 3 combined standard errors (largest {s['agreement']['max_z']:.2f}).

¹ PyHessian's own `trace(maxIter=1)`, one sample per call, on the layer's weight alone (the others frozen), until its
relative standard error is ≤ {cfg['rtol']:.0%} after at least {MIN_SAMPLES} samples. A layer still short at {cfg['pyhessian_cap']} samples is
extrapolated: setup + its measured time per sample × the samples its standard error says it needs, n·(se/(rtol·|mean|))².
Extrapolated: {rp['layers_extrapolated']} of {r['layers']} ResNet-20 layers, {sp['layers_extrapolated']} of {s['layers']} SiLU-net layers.

² One shared Rademacher vector per HVP, read per layer: run for {sh['samples_run']} samples ({sh['seconds_run']:.1f} s, largest relative
standard error {max(sh['rel_stderr'].values()):.1%}){f", then extrapolated to the {sh['samples_needed']} samples its noisiest layer needs for {cfg['rtol']:.0%}" if sh['extrapolated'] else ''}
(layer `{noisiest}`, trace {sa['traces'][noisiest][0]:.3g}: the cross-block terms the shared vector carries swamp its own block's signal).
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rtol", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=3, help="hessq runs per model (median)")
    ap.add_argument("--pyhessian-cap", type=int, default=10, help="samples per layer run for PyHessian before extrapolating")
    ap.add_argument("--whole-samples", type=int, default=50)
    ap.add_argument("--shared-cap", type=int, default=100, help="samples run for the shared-vector Hutchinson before extrapolating")
    ap.add_argument("--part", choices=["all", "resnet20", "silu"], default="all", help="run one model; the other's figures are kept from --out")
    ap.add_argument("--out", default=str(RESULTS / "hessian.json"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from an existing --out JSON")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render_only:
        res = json.loads(out.read_text())
        write_text_atomic(out.with_suffix(".md"), render(res))
        print(render(res))
        return 0
    torch.set_num_threads(args.threads)
    x, y = next(iter(fashion_mnist("train", batch_size=args.batch_size, shuffle=False, limit=args.batch_size)))
    res: dict = {"config": vars(args) | {
        "command": f"PYTHONPATH=src .venv/bin/python bench/hessian.py --threads {args.threads} --repeats {args.repeats} "
                   f"--pyhessian-cap {args.pyhessian_cap} --shared-cap {args.shared_cap}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}}

    if args.part != "all" and out.exists():
        res = json.loads(out.read_text()) | {"config": res["config"]}
    if args.part == "silu":
        res["config"]["command_resnet20"] = json.loads(out.read_text())["config"].get("command_resnet20", "")
    else:
        res["config"]["command_resnet20"] = res["config"]["command"]
    res["config"]["command"] = res["config"]["command"] + (f" --part {args.part}" if args.part != "all" else "")
    if args.part in ("all", "resnet20"):
        run_resnet20(res, x, y, args, out)
    if args.part in ("all", "silu"):
        run_silu(res, x, y, args)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    write_text_atomic(out, json.dumps(res, indent=2))
    md = render(res)
    write_text_atomic(out.with_suffix(".md"), md)
    print(md)
    return 0


def run_resnet20(res, x, y, args, out):
    print("ResNet-20", flush=True)
    model = resnet20(pretrained=True).eval()
    r = {"layers": len(quantizable_layers(model))}
    r["hessq"] = hessq_auto(model, x, y, args.rtol, args.repeats)
    r["pyhessian_per_layer"] = pyhessian_per_layer(model, x, y, args.rtol, args.pyhessian_cap)
    r["pyhessian_whole_50"] = pyhessian_whole(model, x, y, args.whole_samples)
    print(f"  PyHessian whole {r['pyhessian_whole_50']['seconds']:.1f} s", flush=True)
    r["agreement"] = agreement(r["hessq"]["traces"], r["pyhessian_per_layer"])
    res["resnet20"] = r
    write_text_atomic(out.with_suffix(".partial.json"), json.dumps(res, indent=2))


def run_silu(res, x, y, args):
    print("SiLU net", flush=True)
    model = silu_net()
    s = {"layers": len(quantizable_layers(model))}
    s["hessq"] = hessq_auto(model, x, y, args.rtol, args.repeats)
    s["pyhessian_per_layer"] = pyhessian_per_layer(model, x, y, args.rtol, args.pyhessian_cap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, sens = _timed(lambda: hessian_sensitivity(model, (x, y), method="hutchinson", rtol=args.rtol, max_samples=args.shared_cap,
                                                     eigenvalues=False, seed=0))
    n = sens.meta["samples"]
    need = max(n, max(math.ceil(n * (r.trace_stderr / (args.rtol * abs(r.trace))) ** 2) for r in sens.values()))
    s["hessq_shared"] = {"seconds_run": t, "samples_run": n, "converged": sens.meta["converged"], "samples_needed": need,
                         "seconds": t * need / n, "extrapolated": need > n,
                         "rel_stderr": {k: r.trace_stderr / abs(r.trace) for k, r in sens.items()}}
    print(f"  hessq shared {n} samples {t:.1f} s, {need} needed", flush=True)
    s["agreement"] = agreement(s["hessq"]["traces"], s["pyhessian_per_layer"])
    res["silu"] = s


if __name__ == "__main__":
    raise SystemExit(main())
