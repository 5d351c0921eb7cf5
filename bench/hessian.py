"""Bench for the Hessian sensitivity engine (issue 3), side by side with PyHessian in one run.

On the bundled ResNet-20 (Fashion-MNIST checkpoint) and one batch of 256 training images:

1. time per Hessian-vector product: hessq's one HVP over the 22 quantizable layers' weights vs
   PyHessian's ``hessian_vector_product`` (its default: every parameter; and restricted to the
   same 22 weights), both reusing the batch's gradient graph, median of --repeats;
2. time to every layer's Hutchinson trace at --samples samples: hessq (one HVP per sample serves
   all 22 layers) vs PyHessian used per layer the way HAWQ users must (freeze all other
   parameters, build ``hessian``, call ``trace``, 22 times). The per-layer PyHessian run is
   measured at --pyhessian-layer-samples samples per layer (setup timed separately) and
   extrapolated linearly to --samples; the table says so;
3. the whole-model trace (every parameter) from hessq.hessian_trace and PyHessian's ``trace`` at
   --samples samples each, and whether they agree within 2 combined standard errors.

PyHessian is pip-installed for this benchmark only (``pip install pyhessian``); it is not a hessq
dependency. Writes bench/results/hessian.json and bench/results/hessian.md.

    .venv/bin/python bench/hessian.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hessq._io import write_text_atomic
from hessq.data import fashion_mnist
from hessq.graph import quantizable_layers
from hessq.models import resnet20
from hessq.sensitivity import hessian_sensitivity, hessian_trace
from hessq.sensitivity._hvp import HessianOperator, rademacher

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _rademacher_like(params, gen):
    return [rademacher(p.shape, gen, p) for p in params]


def render(res: dict) -> str:
    cfg = res["config"]
    hv, al, wm = res["hvp_seconds"], res["all_layer_traces"], res["whole_model_trace"]
    md = f"""# Hessian engine vs PyHessian (bench/hessian.py)

ResNet-20 ({'random init' if cfg["untrained"] else 'bundled Fashion-MNIST checkpoint'}), one batch of {cfg["batch_size"]} Fashion-MNIST training images, CPU, torch {cfg['torch']}, {cfg['threads']} threads (machine shared with other jobs: absolute times are noisy, ratios are from the same run).

| measure | hessq | PyHessian | ratio (PyHessian / hessq) |
|---|---|---|---|
| time per HVP, median of {cfg["repeats"]} (s) — PyHessian over all {cfg['params']} params | {hv['hessq']:.3f} | {hv['pyhessian_all_params']:.3f} | {hv['pyhessian_all_params'] / hv['hessq']:.2f}× |
| time per HVP, median of {cfg["repeats"]} (s) — PyHessian over the same {cfg['weights']} weights | {hv['hessq']:.3f} | {hv['pyhessian_same_weights']:.3f} | {hv['pyhessian_same_weights'] / hv['hessq']:.2f}× |
| all {cfg["layers"]} per-layer traces at {al['samples']} samples (s) | {al['hessq_s']:.1f} | {al['pyhessian_per_layer_s_extrapolated']:.1f} ¹ | {al['speedup']:.1f}× |
| whole-model trace (all params) at {wm['samples']} samples each | {wm['hessq'][0]:.2f} ± {wm['hessq'][1]:.2f} | {wm['pyhessian'][0]:.2f} ± {wm['pyhessian'][1]:.2f} | differ by {wm['difference_in_combined_stderr']:.2f} combined stderr ({'agree' if wm['agree_within_2_stderr'] else 'DISAGREE'} within 2) |

¹ PyHessian per layer (freeze the other parameters, build `hessian`, `trace()`), run at {al["pyhessian_measured_samples_per_layer"]} samples per layer and
extrapolated linearly to {al['samples']}: setup (forward + backward with create_graph) + {al['samples']}/{al['pyhessian_measured_samples_per_layer']} × the measured trace time, summed over the {cfg["layers"]} layers.

Why {al['speedup']:.1f}× and not {cfg["layers"]}×: a per-layer PyHessian HVP back-propagates (twice) only from the loss down
to that layer, so late layers are cheap (`fc`: {al['pyhessian_per_layer']['fc']['trace_s'] * 1000:.1f} ms) and the {cfg["layers"]} per-layer HVPs of one
sample add up to {sum(r['trace_s'] / r['samples'] for r in al['pyhessian_per_layer'].values()):.1f} s, i.e. {sum(r['trace_s'] / r['samples'] for r in al['pyhessian_per_layer'].values()) / (al['hessq_s'] / al['samples']):.1f} of hessq's
all-layer samples ({al['hessq_s'] / al['samples']:.2f} s each, setup included), plus a forward/backward setup per layer.
"""
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--whole-samples", type=int, default=None, help="samples for the whole-model trace comparison (default --samples)")
    ap.add_argument("--repeats", type=int, default=5, help="HVPs timed per method for part 1")
    ap.add_argument("--pyhessian-layer-samples", type=int, default=2, help="samples per layer actually run for PyHessian per layer")
    ap.add_argument("--untrained", action="store_true", help="random-init ResNet-20 (before the checkpoint exists)")
    ap.add_argument("--out", default=str(RESULTS / "hessian.json"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from an existing --out JSON")
    args = ap.parse_args()
    if args.render_only:
        res = json.loads(Path(args.out).read_text())
        write_text_atomic(Path(args.out).with_suffix(".md"), render(res))
        print(render(res))
        return 0

    from pyhessian import hessian as PyHessian
    from pyhessian.utils import hessian_vector_product

    model = resnet20(pretrained=not args.untrained)
    x, y = next(iter(fashion_mnist("train", batch_size=args.batch_size, shuffle=False, limit=args.batch_size)))
    layers = quantizable_layers(model)
    weights = [m.weight for m in layers.values()]
    gen = torch.Generator().manual_seed(0)
    res: dict = {"config": vars(args) | {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                                         "layers": len(layers), "weights": sum(w.numel() for w in weights),
                                         "params": sum(p.numel() for p in model.parameters())}}

    # 1. time per HVP -------------------------------------------------------------------
    model.eval()
    # All three gradient graphs are built first; the timed HVPs then alternate between the methods
    # (hessq, PyHessian all params, PyHessian same weights) so that load on the machine hits each alike.
    op = HessianOperator(model, [(0, (x, y))], F.cross_entropy, weights, list(layers), cache=True)
    op.products(_rademacher_like(weights, gen))  # builds and caches the gradient graph

    def pyh(params_subset):
        for p in model.parameters():
            p.requires_grad_(False); p.grad = None
        for p in params_subset:
            p.requires_grad_(True)
        h = PyHessian(model, F.cross_entropy, data=(x, y), cuda=False)
        for p in model.parameters():
            p.requires_grad_(True)
        return h

    h_all = pyh(list(model.parameters()))
    h_same = pyh(weights)

    def pyh_hvp(h):
        v = _rademacher_like(h.params, gen)
        return sum(float((a * b).sum()) for a, b in zip(hessian_vector_product(h.gradsH, h.params, v), v))

    hq, ph_all, ph_same = [], [], []
    for _ in range(args.repeats):
        hq.append(_timed(lambda: op.products(_rademacher_like(weights, gen)))[0])
        ph_all.append(_timed(lambda: pyh_hvp(h_all))[0])
        ph_same.append(_timed(lambda: pyh_hvp(h_same))[0])
    del op, h_all, h_same
    for p in model.parameters():
        p.grad = None
    res["hvp_seconds"] = {"hessq": statistics.median(hq), "pyhessian_all_params": statistics.median(ph_all),
                          "pyhessian_same_weights": statistics.median(ph_same), "raw": {"hessq": hq, "pyhessian_all_params": ph_all, "pyhessian_same_weights": ph_same}}
    print("HVP", res["hvp_seconds"], flush=True)
    out = Path(args.out)
    write_text_atomic(out.with_suffix(".partial.json"), json.dumps(res, indent=2))

    # 2. every layer's trace at N samples ----------------------------------------------------
    n = args.samples
    t_hq, sens = _timed(lambda: hessian_sensitivity(model, (x, y), rtol=0.0, max_samples=n, min_samples=n, eigenvalues=False, seed=0))
    print(f"hessq all {len(layers)} layer traces at {n} samples: {t_hq:.1f} s", flush=True)
    m = args.pyhessian_layer_samples
    per_layer = {}
    for name, mod in layers.items():
        for p in model.parameters():
            p.requires_grad_(False); p.grad = None
        mod.weight.requires_grad_(True)
        t_setup, h = _timed(lambda: PyHessian(model, F.cross_entropy, data=(x, y), cuda=False))
        t_tr, vals = _timed(lambda: h.trace(maxIter=m, tol=float("-inf")))
        per_layer[name] = {"setup_s": t_setup, "trace_s": t_tr, "samples": len(vals), "extrapolated_s": t_setup + t_tr * n / len(vals),
                           "trace_mean": float(np.mean(vals))}
        del h
        print(name, per_layer[name], flush=True)
    for p in model.parameters():
        p.requires_grad_(True); p.grad = None
    t_ph = sum(r["extrapolated_s"] for r in per_layer.values())
    res["all_layer_traces"] = {"samples": n, "hessq_s": t_hq, "pyhessian_per_layer_s_extrapolated": t_ph,
                               "pyhessian_measured_samples_per_layer": m, "speedup": t_ph / t_hq, "pyhessian_per_layer": per_layer,
                               "hessq_traces": {k: [r.trace, r.trace_stderr] for k, r in sens.items()}}

    write_text_atomic(out.with_suffix(".partial.json"), json.dumps(res, indent=2))

    # 3. whole-model trace ---------------------------------------------------------------------
    n = args.whole_samples or args.samples
    t_hw, est = _timed(lambda: hessian_trace(model, (x, y), rtol=0.0, max_samples=n, min_samples=n, seed=1))
    h = PyHessian(model, F.cross_entropy, data=(x, y), cuda=False)
    t_pw, vals = _timed(lambda: h.trace(maxIter=n, tol=float("-inf")))
    del h
    ph_mean, ph_se = float(np.mean(vals)), float(np.std(vals, ddof=1) / math.sqrt(len(vals)))
    comb = math.hypot(est.stderr, ph_se)
    res["whole_model_trace"] = {"samples": n, "hessq": [est.trace, est.stderr], "pyhessian": [ph_mean, ph_se],
                                "difference_in_combined_stderr": abs(est.trace - ph_mean) / comb, "agree_within_2_stderr": abs(est.trace - ph_mean) <= 2 * comb,
                                "hessq_s": t_hw, "pyhessian_s": t_pw}
    print("whole", res["whole_model_trace"])
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    write_text_atomic(out, json.dumps(res, indent=2))
    md = render(res)
    write_text_atomic(out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
