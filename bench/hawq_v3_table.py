"""HAWQ-V3's ImageNet results table, reproduced for the bundled ResNet-20 on Fashion-MNIST.

Rows: FP32, W8A8 (post-training only), W4A8, W4A4, and Hessian-aware mixed-precision plans
(weights 4 or 8 bits per layer, activations 8, first/last layer pinned to 8) under size, BOPs
and latency limits of 25/50/75% of the way from the all-4-bit to the all-8-bit setting. Every
quantized accuracy is that of the integer model (hessq.to_integer) on the 10,000 test images;
latency is ONNX Runtime (the "fast" QLinearConv export; the FP32 row: torch.onnx.export).

    .venv/bin/python bench/hawq_v3_table.py [--qat-epochs 1] [--quick] [--out bench/results]

Writes hawq_v3_table.json and hawq_v3_table.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from torch import nn

import hessq
from hessq._io import write_text_atomic
from hessq.data import fashion_mnist
from hessq.integer import measure_latency_table
from hessq.plan import LatencyTable, Relative, evaluate_plan, plan_bits
from hessq.sensitivity import Sensitivity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, T0, cached_sensitivity, checkpoint_sha, command_line, export_fp32, log,  # noqa: E402
                     machine, ort_ms, write_results)

SHAPE = (1, 28, 28)
FRACTIONS = (0.25, 0.5, 0.75)
PARTIAL = Path(tempfile.gettempdir()) / "hawq_v3_table.partial.json"  # rows done so far, for --resume

Bits = dict[str, tuple[int, int]]  # layer -> (weight bits, activation bits)


def ort_latency(path: Path, reps: dict[int, int]) -> dict[str, float]:
    return {f"ms_b{batch}": ort_ms(path, SHAPE, batch, n, torch.get_num_threads()) for batch, n in reps.items()}


def get_sensitivity(model: nn.Module) -> tuple[Sensitivity, dict[str, Any]]:
    """bench/plan.py's cached traces when they belong to this checkpoint, else one batch of 256 (~1 min)."""
    cache = RESULTS / "plan_sensitivity.json"
    sens = cached_sensitivity(cache, checkpoint_sha())
    if sens is not None:
        return sens, {"source": f"cache {cache.name}", **sens.meta}
    batch = fashion_mnist("train", batch_size=256, shuffle=True, seed=2).take(1)
    sens = hessq.hessian_sensitivity(model, batch, None, rtol=0.1, max_samples=40, seed=0, eigenvalues=False)
    return sens, {"source": "computed (1 batch of 256 training images)", **sens.meta}


def cost_figures(model: nn.Module, bits: Bits, sens: Sensitivity) -> dict[str, float]:
    """Cost model of a plan; BOPs summed per layer so uniform A4 rows count their 8-bit first/last layer right."""
    p = evaluate_plan(model, {n: w for n, (w, _) in bits.items()}, sens, input_shape=SHAPE)
    bops = sum(p.layers[n]["macs"] * w * a for n, (w, a) in bits.items())
    return {"average_bits": p.average_bits, "size_bytes": p.size_bytes, "bops": bops, "omega": p.omega}


def compact(bits: Bits) -> str:
    """Weight bits per stage in network order, e.g. 'conv1 8 · layer1 444444 · … · fc 8'."""
    stages: dict[str, str] = {}
    for name, (w, _) in bits.items():
        stages[name.split(".")[0]] = stages.get(name.split(".")[0], "") + str(w)
    return " · ".join(f"{k} {v}" for k, v in stages.items())


def mixed_plans(model: nn.Module, sens: Sensitivity, table: LatencyTable) -> list[dict[str, Any]]:
    """The nine ILP plans; a latency limit whose lowest and highest totals coincide is handled openly."""
    out = []
    for kind in ("size", "bops", "latency"):
        for f in FRACTIONS:
            note = ""
            kw: dict[str, Any] = {f"{kind}_limit": Relative(f)}
            try:
                plan = plan_bits(model, sens, weight_bits=(4, 8), latency_table=table, input_shape=SHAPE, **kw)
            except ValueError as exc:  # e.g. a degenerate range; plan under the all-8 latency instead
                all8 = evaluate_plan(model, 8, latency_table=table, input_shape=SHAPE).latency
                plan = plan_bits(model, sens, weight_bits=(4, 8), latency_table=table, input_shape=SHAPE,
                                 latency_limit=all8)
                note = f"relative limit rejected ({exc}); planned under the all-8 latency {all8:.3g} s"
            out.append({"setting": f"{kind} {int(f * 100)}%", "limit": {kind: plan.limits.get(kind)},
                        "plan": {n: (b, 8) for n, b in plan.items()}, "note": note})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qat-epochs", type=float, default=0.5,
                    help="QAT epochs per quantized row except W8A8, fractions allowed (default 0.5)")
    ap.add_argument("--qat-steps", type=int, default=None, help="cap QAT at this many steps (to bound time)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 QAT steps, 1,000 test images, few repeats")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--resume", action="store_true", help=f"reuse the rows finished by an interrupted run ({PARTIAL})")
    ap.add_argument("--settings", default=None,
                    help="comma-separated rows to run besides FP32, e.g. W8A8,W4A4 (a check after a change; default: all)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    qat_steps = 20 if args.quick else args.qat_steps
    reps = {1: 10, 64: 3} if args.quick else {1: 200, 64: 30}

    model = hessq.models.resnet20(pretrained=True).eval()
    test = fashion_mnist("test", batch_size=500, limit=1000 if args.quick else None)
    calib = fashion_mnist("train", batch_size=128, shuffle=True, seed=1).take(8)
    train = fashion_mnist("train", batch_size=128, augment=True, seed=0)
    work = Path(tempfile.mkdtemp(prefix="hawq_v3_"))

    log("FP32: accuracy and ONNX Runtime latency")
    fp32_acc = hessq.accuracy(model, test)
    export_fp32(model, SHAPE, work / "fp32.onnx")
    macs = sum(d["macs"] for d in evaluate_plan(model, 8, input_shape=SHAPE).layers.values())
    rows: list[dict[str, Any]] = [{
        "setting": "FP32", "wa": "32/32", "average_bits": 32.0, "top1": fp32_acc, "ptq_top1": None,
        "size_bytes": 4 * sum(p.numel() for p in model.parameters()), "packed_bytes": None,
        "bops": macs * 32 * 32, "qat": None}]
    # Latencies are measured together at the end, on exported files, so that training never shares the CPU with them.
    onnx_paths: dict[str, Path] = {"FP32": work / "fp32.onnx"}
    log(f"  top-1 {100 * fp32_acc:.2f}%")

    sens, sens_info = get_sensitivity(model)
    log(f"sensitivity: {sens_info['source']}")
    log("W8A8 post-training quantization and the per-layer latency table")
    w8a8 = hessq.quantize(model, 8, calib, progress=False)
    table = measure_latency_table(hessq.to_integer(w8a8), repeats=5 if args.quick else 50, threads=2)
    degenerate = all(row[4] == row[8] for row in table.values())
    specs = [{"setting": "W8A8", "wa": "8/8", "plan": 8, "qmodel": w8a8},
             {"setting": "W4A8", "wa": "4/8 (first, last 8/8)", "plan": 4},
             {"setting": "W4A4", "wa": "4/4 (first, last 8/8)", "plan": (4, 4)}]
    specs += [{**m, "wa": "4/8 mixed"} for m in mixed_plans(model, sens, table)]
    if args.settings:
        wanted = [name.strip() for name in args.settings.split(",")]
        unknown = [name for name in wanted if name not in {s["setting"] for s in specs}]
        if unknown:
            ap.error(f"--settings: no row named {unknown}; the rows are {[s['setting'] for s in specs]}")
        specs = [s for s in specs if s["setting"] in wanted]

    config = {"quick": args.quick, "qat_epochs": args.qat_epochs, "qat_steps": qat_steps, "settings": args.settings}
    prev: dict[str, dict[str, Any]] = {}
    prev_onnx: dict[str, str] = {}  # the interrupted run's exported files, so that resumed rows get their latency
    if args.resume and PARTIAL.exists():
        saved = json.loads(PARTIAL.read_text())
        if saved["config"] == config:
            prev = {r["setting"]: r for r in saved["rows"]}
            prev_onnx = saved.get("onnx", {})

    def save_partial() -> None:
        onnx = {n: str(p) for n, p in onnx_paths.items() if n != "FP32"}
        write_text_atomic(PARTIAL, json.dumps({"config": config, "rows": rows[1:], "onnx": onnx}))
    done: dict[tuple, dict[str, Any]] = {}  # bits -> the first row that ran them (no retraining)
    for spec in specs:
        name = spec["setting"]
        if name in prev and name != "W8A8":  # W8A8's model is at hand anyway; its row takes ~2 min
            row = prev[name]
            if not row.get("same_as"):
                done[tuple(sorted((n, tuple(b)) for n, b in row["bits"].items()))] = row
            rows.append(row)
            if name in prev_onnx and Path(prev_onnx[name]).exists():
                onnx_paths[name] = Path(prev_onnx[name])
            log(f"{name}: resumed from {PARTIAL}")
            continue
        q = spec.get("qmodel") or hessq.quantize(model, spec["plan"], calib, progress=False)
        bits: Bits = {n: tuple(b) for n, b in q.layer_bits.items()}
        key = tuple(sorted(bits.items()))
        wa = "8/8 (ILP chose all 8)" if spec.get("limit") and all(w == 8 for w, _ in bits.values()) else spec["wa"]
        row: dict[str, Any] = {"setting": name, "wa": wa, "limit": spec.get("limit"),
                               "note": spec.get("note", ""), "bits": {n: list(b) for n, b in bits.items()},
                               "bits_compact": compact(bits), **cost_figures(model, bits, sens)}
        if key in done:
            first = done[key]
            log(f"{name}: same plan as {first['setting']}, reusing its results")
            row.update({k: first.get(k) for k in ("top1", "ptq_top1", "packed_bytes", "ms_b1", "ms_b64", "qat")})
            row["same_as"] = first["setting"]
            rows.append(row)
            save_partial()
            continue
        imodel = hessq.to_integer(q)
        t = time.time()
        row["ptq_top1"] = hessq.accuracy(imodel, test)
        log(f"{name}: PTQ integer top-1 {100 * row['ptq_top1']:.2f}% ({time.time() - t:.0f} s)")
        row["qat"] = None
        if name != "W8A8":  # HAWQ-V3's 8-bit row is post-training only; everything else gets QAT
            t = time.time()
            hist = hessq.finetune(q, train, teacher=model, epochs=args.qat_epochs, lr=0.01, max_steps=qat_steps,
                                  progress=False, seed=0)
            row["qat"] = {"steps": hist["steps"], "epoch_loss": hist["epoch_loss"], "seconds": time.time() - t}
            log(f"  QAT {hist['steps']} steps in {time.time() - t:.0f} s")
            imodel = hessq.to_integer(q)
            t = time.time()
            row["top1"] = hessq.accuracy(imodel, test)
            log(f"  QAT integer top-1 {100 * row['top1']:.2f}% ({time.time() - t:.0f} s)")
        else:
            row["top1"] = row["ptq_top1"]
        row["packed_bytes"] = imodel.size_bytes()
        path = work / f"{len(rows)}.onnx"
        hessq.export_onnx(imodel, path, mode="fast")
        onnx_paths[name] = path
        log(f"  avg {row['average_bits']:.2f} b, {row['size_bytes'] / 1024:.1f} KB, {row['bops'] / 1e9:.3f} GBOPs")
        done[key] = row
        rows.append(row)
        save_partial()

    log("ONNX Runtime latency of every setting (batch 1 and 64, medians)")
    by_name = {r["setting"]: r for r in rows}
    for name, path in onnx_paths.items():
        by_name[name].update(ort_latency(path, reps))
        log(f"  {name}: ms b1 {by_name[name]['ms_b1']:.3f} b64 {by_name[name]['ms_b64']:.2f}")
    for r in rows:
        if r.get("same_as"):
            r.update({k: by_name[r["same_as"]].get(k) for k in ("ms_b1", "ms_b64")})
        for k in ("ms_b1", "ms_b64"):  # a resumed row whose exported file is gone: not measured
            if r.get(k) is None:
                r[k] = float("nan")

    meta = {
        "command": command_line().replace(" --resume", ""),
        "resumed_rows": [n for n in prev if n != "W8A8"],
        "machine": machine(), "torch": torch.__version__,
        "onnxruntime": ort.__version__, "threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
        "test_images": len(test.targets), "calibration_images": sum(len(y) for _, y in calib),
        "qat": {"epochs": args.qat_epochs, "max_steps": qat_steps, "lr": 0.01, "steps_per_epoch": len(train),
                "teacher": "FP32 model (distillation loss)", "augment": True, "seed": 0},
        "sensitivity": {k: v for k, v in sens_info.items() if not isinstance(v, (dict, list))},
        "latency_table": {"degenerate_w4_eq_w8": degenerate, **table.meta,
                          "seconds": {n: {str(b): s for b, s in r.items()} for n, r in table.items()}},
        "wall_seconds": time.time() - T0,
    }
    md = markdown(meta, rows, fp32_acc)
    write_results(args.out / "hawq_v3_table.json", {"meta": meta, "rows": rows}, md)
    print(md, flush=True)
    PARTIAL.unlink(missing_ok=True)
    log(f"wrote {args.out / 'hawq_v3_table.md'} and .json")
    return 0


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], fp32: float) -> str:
    q = meta["qat"]
    qat = f"{q['epochs']} epoch(s)" + (f", at most {q['max_steps']} steps" if q["max_steps"] else "")
    out = [f"# HAWQ-V3 table: ResNet-20 on Fashion-MNIST ({meta['test_images']:,} test images, integer model)", "",
           f"Regenerate: `{meta['command']}`", "",
           f"Machine: {meta['machine']}; torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, "
           f"{meta['threads']} threads. Date: {meta['date_utc']}. Wall time {meta['wall_seconds'] / 60:.1f} min.", "",
           "| setting | W/A bits | avg W bits | top-1 (%) | Δ vs FP32 | PTQ top-1 (%) | size (KB) | packed file (KB) "
           "| BOPs (G) | ORT ms b=1 | ORT ms b=64 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def kb(v):
            return "–" if v is None else f"{v / 1024:.1f}"
        ptq = "–" if r["ptq_top1"] is None else f"{100 * r['ptq_top1']:.2f}"
        same = f" (same plan as {r['same_as']})" if r.get("same_as") else ""
        out.append(f"| {r['setting']}{same} | {r['wa']} | {r['average_bits']:.2f} | {100 * r['top1']:.2f} | "
                   f"{100 * (r['top1'] - fp32):+.2f} | {ptq} | {kb(r['size_bytes'])} | {kb(r['packed_bytes'])} | "
                   f"{r['bops'] / 1e9:.3f} | {r['ms_b1']:.3f} | {r['ms_b64']:.2f} |")
    lat = meta["latency_table"]
    s = meta["sensitivity"]
    out += ["", "Notes:", "",
            f"- top-1: the integer model (`hessq.to_integer`, reference executor) after QAT ({qat}, SGD lr 0.01 cosine, "
            "distillation from the FP32 model, augmented training data, seed 0) for every row but FP32 and W8A8 "
            "(post-training only, as in HAWQ-V3). PTQ top-1: the same integer model before QAT. "
            f"Calibration: {meta['calibration_images']} training images.",
            "- size: cost model (packed weights + int32 biases + float32 per-channel scales; FP32: float32 "
            "parameters). packed file: `IntegerModel.size_bytes()`. BOPs: Σ MACs × weight bits × activation bits "
            "(batch 1). ORT: median ms of the `mode=\"fast\"` ONNX export (FP32: `torch.onnx.export`), "
            f"{meta['threads']} threads.",
            "- Mixed rows: ILP (`plan_bits`, weights 4 or 8, activations 8, first/last layer pinned to 8, residual "
            "shortcuts tied to their block) under the limit `Relative(f)`: lowest + f·(highest − lowest).",
            f"- Sensitivity: `hessq.hessian_sensitivity` (rtol 0.1; exact Gauss-Newton traces where the model is "
            f"piecewise linear), {s.get('source')}, {s.get('images', s.get('num_data'))} training images.",
            "- Latency limits: " + ("**degenerate on this runtime.** ONNX Runtime's CPU kernels compute every weight "
            "width from 2 to 8 bits as int8, so the measured per-layer table gives W4 and W8 the same latency; the "
            "lowest and highest total latency coincide, every plan meets any latency limit, and the ILP returns the "
            "least-perturbation plan: all 8-bit. The latency rows are therefore the W8A8 plan; no latency difference "
            "is claimed." if lat["degenerate_w4_eq_w8"] else "the measured table distinguishes W4 from W8."),
           ]
    out += [f"- {r['setting']}: {r['note']}" for r in rows if r.get("note")]
    out += ["", "Weight bits per layer (network order) of the mixed plans:", ""]
    out += [f"- {r['setting']} (avg {r['average_bits']:.2f} b, Ω {r['omega']:.3g}): {r['bits_compact']}"
            for r in rows if r.get("limit")]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
