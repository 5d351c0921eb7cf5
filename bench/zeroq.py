"""Bench for data-free quantization (ZeroQ, issue 6).

1. Distillation time and final BatchNorm-statistics loss, 32 images, for the bundled ResNet-20
   (1×28×28) and EfficientNet-Lite0 (3×224×224), with the loss of real data and of N(0,1) noise
   for reference.
2. ResNet-20 on the 10,000 Fashion-MNIST test images: FP32 vs W8A8 calibrated on the distilled
   images (no data at all), on 32 real training images, and on 32 N(0,1) noise images.
3. EfficientNet-Lite0 (ImageNet weights) W8A8, per-channel weights: calibrated on 32 distilled
   images per ``--label-weights`` entry (0: plain ZeroQ; λ > 0: plus λ·cross-entropy to random
   labels), on 32 N(0,1) noise images, and on 32 random crops of scikit-image's photos; scored
   as top-1 agreement with FP32 on ``--eval-crops`` other crops (another seed).
4. Data-free mixed precision on EfficientNet-Lite0: ZeroQ KL sensitivity on the last distilled
   set, the planner's ILP at the size of uniform 6-bit (first and last layer 8-bit in every
   setting), candidates {4, 8} and {4, 6, 8}, against uniform 6-bit; all calibrated on it.

    .venv/bin/python bench/zeroq.py                        # everything; writes bench/results/zeroq.{json,md}
    .venv/bin/python bench/zeroq.py --skip resnet20 --device cuda   # EfficientNet on a GPU (ResNet-20 figures kept)
    .venv/bin/python bench/zeroq.py --quick                # a smoke run with tiny settings (not for quoting)

Torch runs on ``--threads`` threads (default 1: on a shared 2-core machine a thread pool mostly waits).
An EfficientNet distillation step takes ~4-6 s on 2 CPU cores (~40 min for 500 steps), 0.03 s on an H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import hessq
from hessq.distill import distill_data, statistics_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, agreement, fake_quant, log, machine, predictions, write_results  # noqa: E402


def distill_row(name: str, model: torch.nn.Module, shape: tuple[int, ...], real: torch.Tensor, args, steps: int,
                input_range: tuple[float, float] | None = None, label_weight: float = 0.0) -> tuple[dict, object]:
    log(f"{name}: distilling {args.num_samples} images of {shape}, {steps} steps, label weight {label_weight:g}")
    d = distill_data(model, args.num_samples, shape, steps=steps, batch_size=args.num_samples, seed=args.seed,
                     progress=not args.no_progress, input_range=input_range, label_weight=label_weight)
    noise = torch.randn((args.num_samples, *shape), generator=torch.Generator().manual_seed(args.seed + 1))
    row = {
        "model": name,
        "images": args.num_samples,
        "input_shape": list(shape),
        "steps": steps,
        "lr": d.lr,
        "label_weight": label_weight,
        "seconds": d.seconds,
        "seconds_per_step": d.seconds / max(steps, 1),
        "initial_loss": d.initial_loss,
        "final_loss": d.loss,
        "real_data_loss": statistics_loss(model, real[: args.num_samples]),
        "noise_loss": statistics_loss(model, noise),
        "bn_layers": d.num_bn_layers,
    }
    log(f"{name}: {d.seconds:.1f}s, loss {d.initial_loss:.4g} -> {d.loss:.4g} (real data {row['real_data_loss']:.4g}, noise {row['noise_loss']:.4g})")
    return row, d


def resnet20_part(args) -> tuple[dict, dict]:
    from hessq.data import fashion_mnist

    model = hessq.models.resnet20(pretrained=True)
    test = fashion_mnist("test", batch_size=500, limit=args.test_limit)
    real = fashion_mnist("train", batch_size=args.num_samples, shuffle=True, seed=args.seed).take(1)[0][0]
    row, d = distill_row("resnet20", model, (1, 28, 28), real, args, args.resnet_steps)
    noise = torch.randn((args.num_samples, 1, 28, 28), generator=torch.Generator().manual_seed(args.seed + 2))
    fp32 = hessq.accuracy(model, test)
    acc = {"fp32": fp32}
    for label, calib in (("distilled", d.inputs), ("real", real), ("noise", noise)):
        acc[f"w8a8_{label}"] = hessq.accuracy(hessq.quantize(model, (8, 8), [calib]), test)
        log(f"resnet20 W8A8 calibrated on {label}: {100 * acc[f'w8a8_{label}']:.2f}% (FP32 {100 * fp32:.2f}%)")
    acc["test_images"] = len(test.inputs)
    return row, acc


def efficientnet_part(args) -> tuple[dict, dict]:
    from hessq.data import photo_crops
    from hessq.models import efficientnet_lite0, preprocess_lite
    from hessq.plan import evaluate_plan, plan_bits
    from hessq.sensitivity import kl_sensitivity

    model = efficientnet_lite0(pretrained=True).to(args.device)
    shape = (3, 224, 224)
    eval_x = preprocess_lite(photo_crops(args.eval_crops, seed=1000 + args.seed))
    photo_x = preprocess_lite(photo_crops(args.num_samples, seed=2000 + args.seed))
    noise_x = torch.randn((args.num_samples, *shape), generator=torch.Generator().manual_seed(args.seed + 3))
    ref = predictions(model, eval_x)
    # Pixels kept in the range preprocessing can produce ((px − 127)/128 for px in 0..255), as `hessq distill` does.
    rows, calibrations = [], []
    for weight in args.label_weights:
        row, d = distill_row("efficientnet_lite0", model, shape, photo_x, args, args.effnet_steps,
                             input_range=(-127 / 128, 1.0), label_weight=weight)
        row["input_range"] = [-127 / 128, 1.0]
        rows.append(row)
        calibrations.append((f"distilled_lw{weight:g}", d.inputs))
        if args.save_distilled:
            d.save(RESULTS / f"{args.stem}_efficientnet_distilled_lw{weight:g}.pt")

    out: dict = {"eval_crops": len(eval_x), "calibration_images": args.num_samples, "eval_arithmetic": "float fake-quant",
                 "label_weights": list(args.label_weights)}
    for label, calib in (*calibrations, ("noise", noise_x), ("photos", photo_x)):
        t = time.perf_counter()
        q = fake_quant(hessq.quantize(model, (8, 8), [calib]))
        out[f"w8a8_{label}"] = agreement(q, eval_x, ref)
        log(f"EfficientNet-Lite0 W8A8 calibrated on {label}: agreement {100 * out[f'w8a8_{label}']:.2f}% ({time.perf_counter() - t:.0f}s)")

    # Data-free mixed precision: KL sensitivity on the last distilled set, ILP at uniform-6 size.
    out["plans_distilled"] = calibrations[-1][0]
    d_inputs = calibrations[-1][1]
    t = time.perf_counter()
    kl_x = d_inputs[: args.kl_images]
    sens = kl_sensitivity(model, [kl_x], weight_bits=(4, 6, 8), progress=not args.no_progress)
    out["kl_seconds"] = time.perf_counter() - t
    out["kl_images"] = len(kl_x)
    sens.save(RESULTS / f"{args.stem}_efficientnet_kl.json")
    log(f"KL sensitivity: {out['kl_seconds']:.0f}s for {len(sens)} layers × 3 bit widths on {len(kl_x)} images")
    names = list(sens)
    uniform = {n: 6 for n in names}
    uniform[names[0]] = uniform[names[-1]] = 8
    base = evaluate_plan(model, uniform, sens, input_shape=shape)
    plans = {"uniform6": base}
    for label, cands in (("kl_mixed_4_8", (4, 8)), ("kl_mixed_4_6_8", (4, 6, 8))):
        plans[label] = plan_bits(model, sens, weight_bits=cands, size_limit=base.size_bytes, input_shape=shape)
    u4 = {n: 4 for n in names}
    u4[names[0]] = u4[names[-1]] = 8
    out["size_bytes"] = {
        "uniform4": evaluate_plan(model, u4, input_shape=shape).size_bytes,
        "uniform8": evaluate_plan(model, 8, input_shape=shape).size_bytes,
    }
    for label, plan in plans.items():
        q = fake_quant(hessq.quantize(model, {n: (plan[n], 8) for n in names}, [d_inputs]))
        counts = {str(b): sum(1 for n in names if plan[n] == b) for b in sorted(set(plan.values()))}
        out[label] = {
            "agreement": agreement(q, eval_x, ref),
            "size_bytes": plan.size_bytes,
            "average_bits": plan.average_bits,
            "kl_omega": plan.omega,
            "layers_per_bits": counts,
        }
        out["size_bytes"][label] = plan.size_bytes
        log(f"{label}: agreement {100 * out[label]['agreement']:.2f}%, size {plan.size_bytes / 1e6:.3f} MB, "
            f"avg bits {plan.average_bits:.2f}, Σ KL {plan.omega:.4g}, layers per bits {counts}")
    return rows, out


def markdown(res: dict) -> str:
    where = f", EfficientNet-Lite0 on {res['device']}" if res.get("device", "cpu") != "cpu" else ""
    lines = [f"# ZeroQ bench ({res['machine']}, torch {res['torch']}, {res['threads']} thread(s){where})", ""]
    lines += ["## Distillation (32 images, Adam lr 0.5, one batch)", "",
              "| model | input | label weight | steps | time (s) | s/step | loss: noise start | final | real data | N(0,1) noise |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["distillation"]:
        lines.append(f"| {r['model']} | {'×'.join(map(str, r['input_shape']))} | {r.get('label_weight', 0):g} | {r['steps']} | {r['seconds']:.1f} | "
                     f"{r['seconds_per_step']:.3f} | {r['initial_loss']:.4g} | {r['final_loss']:.4g} | {r['real_data_loss']:.4g} | {r['noise_loss']:.4g} |")
    if "resnet20" in res:
        a = res["resnet20"]
        lines += ["", f"## ResNet-20, Fashion-MNIST test ({a['test_images']} images), W8A8 per-channel", "",
                  "| calibration (32 images) | top-1 (%) | Δ vs FP32 (points) |", "|---|---:|---:|",
                  f"| FP32 | {100 * a['fp32']:.2f} | |"]
        for k in ("distilled", "real", "noise"):
            v = a[f"w8a8_{k}"]
            lines.append(f"| {k} | {100 * v:.2f} | {100 * (v - a['fp32']):+.2f} |")
    if "efficientnet" in res:
        e = res["efficientnet"]
        lines += ["", f"## EfficientNet-Lite0, top-1 agreement with FP32 on {e['eval_crops']} held-out photo crops ({e['eval_arithmetic']})", "",
                  "| setting | calibration | agreement (%) | size (MB) |", "|---|---|---:|---:|"]
        labels = {f"distilled_lw{w:g}": ("distilled (ZeroQ)" if w == 0 else f"distilled + random labels (λ={w:g})")
                  for w in e.get("label_weights", [])}
        for k in (*labels, "noise", "photos"):
            lines.append(f"| W8A8 | {labels.get(k, k)} | {100 * e[f'w8a8_{k}']:.2f} | {e['size_bytes']['uniform8'] / 1e6:.3f} |")
        for k, label in (("uniform6", "W6A8 uniform"), ("kl_mixed_4_8", "KL plan, {4,8} bits"), ("kl_mixed_4_6_8", "KL plan, {4,6,8} bits")):
            lines.append(f"| {label} (avg {e[k]['average_bits']:.2f} bits, Σ KL {e[k]['kl_omega']:.3g}) | {labels.get(e['plans_distilled'], 'distilled')} | {100 * e[k]['agreement']:.2f} | {e[k]['size_bytes'] / 1e6:.3f} |")
        lines.append(f"\nUniform 4-bit size {e['size_bytes']['uniform4'] / 1e6:.3f} MB, uniform 8-bit {e['size_bytes']['uniform8'] / 1e6:.3f} MB "
                     f"(first and last layer 8-bit throughout). KL sensitivity: {e['kl_seconds']:.0f}s on {e['kl_images']} distilled images.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--resnet-steps", type=int, default=500)
    p.add_argument("--effnet-steps", type=int, default=500)
    p.add_argument("--label-weights", type=float, nargs="+", default=[0.0, 1.0],
                   help="EfficientNet distillations: 0 is plain ZeroQ, > 0 adds that weight of cross-entropy to random labels; "
                        "the KL plans use the last")
    p.add_argument("--eval-crops", type=int, default=256)
    p.add_argument("--kl-images", type=int, default=16, help="distilled images the KL sensitivity averages over")
    p.add_argument("--test-limit", type=int, default=None, help="Fashion-MNIST test images (default all 10,000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where EfficientNet-Lite0 runs (cpu, cuda); ResNet-20 stays on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", choices=("resnet20", "efficientnet"), action="append", default=[])
    p.add_argument("--save-distilled", action="store_true", help="keep the distilled EfficientNet images in bench/results")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (results written to zeroq_quick.*)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.resnet_steps, args.effnet_steps, args.eval_crops, args.test_limit, args.kl_images = 5, 2, 8, 500, 2
        args.num_samples, args.label_weights = 4, [0.0, 1.0]
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.stem = "zeroq_quick" if args.quick else "zeroq"
    previous = RESULTS / f"{stem}.json"
    # A partial run (--skip) keeps the other part's figures from the last run.
    kept = json.loads(previous.read_text()) if args.skip and previous.exists() else {}
    res: dict = {
        "hessq_version": hessq.__version__,
        "torch": torch.__version__,
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "args": vars(args),
        "distillation": [],
    }
    for part, model_name in (("resnet20", "resnet20"), ("efficientnet", "efficientnet_lite0")):
        if part in args.skip and part in kept:
            res[part] = kept[part]
            res["distillation"] += [r for r in kept.get("distillation", []) if r["model"] == model_name]
            res.setdefault("kept_from_previous_run", []).append(part)
    start = time.perf_counter()
    if "resnet20" not in args.skip:
        row, acc = resnet20_part(args)
        res["distillation"].insert(0, row)
        res["resnet20"] = acc
    if "efficientnet" not in args.skip:
        rows, eff = efficientnet_part(args)
        res["distillation"] += rows
        res["efficientnet"] = eff
    res["total_seconds"] = time.perf_counter() - start
    md = markdown(res)
    write_results(RESULTS / f"{stem}.json", res, md)
    print(md)
    log(f"wrote {RESULTS / (stem + '.json')} and .md in {res['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
