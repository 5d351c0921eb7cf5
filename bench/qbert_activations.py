"""Where MiniLM's W8A8 accuracy goes: the W8A8 model (8-bit weights, activations and embeddings, percentile ranges),
then each group of its activation quantizers widened to 16 bits in turn, the rest left at 8 (recalibrated on the same
batches); then the fix, side by side: percentile or least-squared-error ('mse') ranges, with the residual stream on
8-bit or 16-bit grids (``hessq.quantize(act_range=..., residual_bits=...)``; mse and 16 are the defaults for a
transformer).

The groups: the residual stream (every add's output and LayerNorm input), LayerNorm outputs, the inputs of the
attention matmuls (QKᵀ, attention·V), softmax, GELU (input, output, both), the embeddings' outputs, and the
attention context (the input of each attention output projection). Accuracy is the fake-quantized model's
(float fake quantization) on the first ``--test-limit`` test texts.

    .venv/bin/python bench/qbert_activations.py [--task tweets] [--test-limit 1024] [--act-range mse]
        [--residual-bits 16] [--groups GROUP ...] [--no-range-rows]

Writes qbert_activations.json and .md to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

import hessq
from hessq.graph import act_quantizers, quantizable_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, log, machine, write_results  # noqa: E402

RESIDUAL = r"quant_add_\d+\.output|quant_layer_norm_\d+\.input"
GROUPS = {  # name -> patterns of activation-quantizer paths
    "residual stream (add outputs, LayerNorm inputs)": [RESIDUAL],
    "LayerNorm outputs": [r"quant_layer_norm_\d+\.output"],
    "attention matmul inputs": [r"quant_matmul_act"],
    "softmax input and output": [r"quant_softmax"],
    "GELU input": [r"quant_gelu_\d+\.input"],
    "GELU output": [r"quant_gelu_\d+\.output"],
    "GELU input and output": [r"quant_gelu"],
    "embedding outputs": [r"embeddings\."],
    "attention context": [r"attention\.output\.dense\.input"],
    "residual stream + GELU output": [RESIDUAL, r"quant_gelu_\d+\.output"],
    "every activation (8-bit weights alone)": [r"."],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("tweets", "bbc"), default="tweets")
    ap.add_argument("--test-limit", type=int, default=1024)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--act-range", choices=("percentile", "mse"), default="percentile",
                    help="ranges of the W8A8 model the groups are widened from")
    ap.add_argument("--residual-bits", type=int, choices=(8, 16), default=8,
                    help="residual stream of the W8A8 model the groups are widened from")
    ap.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS), metavar="GROUP",
                    help="the groups to widen, by name (default: all)")
    ap.add_argument("--no-range-rows", dest="range_rows", action="store_false",
                    help="skip the last four rows (percentile/mse ranges × 8/16-bit residual stream)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    load = hessq.data.tweets if args.task == "tweets" else hessq.data.bbc_news
    model = hessq.models.minilm_finetuned(args.task)
    calib = [b for _, b in zip(range(args.calibration_batches), load("train", batch_size=32 if args.task == "tweets"
                                                                        else 16, shuffle=False))]
    test = [b for _, b in zip(range(-(-args.test_limit // 64)), load("test", batch_size=64))]

    def accuracy(m) -> float:
        if hasattr(m, "integer_eval"):
            m.integer_eval = False
        return round(100 * float(hessq.accuracy(m, test)), 2)

    rows = [{"setting": "FP32", "accuracy": accuracy(model)}]
    plan = {n: 8 for n in quantizable_layers(model)}
    q = hessq.quantize(model, plan, calib, pin_first_last=None, act_range=args.act_range,
                       residual_bits=args.residual_bits)
    quantizers = act_quantizers(q)
    rows.append({"setting": f"W8A8, {args.act_range} ranges, {args.residual_bits}-bit residual stream",
                 "accuracy": accuracy(q), "quantizers": len(quantizers)})
    log(f"{rows}")
    for name, patterns in ((g, GROUPS[g]) for g in args.groups):
        wide = [n for n in quantizers if any(re.search(p, n) for p in patterns)]
        for n in wide:
            quantizers[n].set_bits(16)
        hessq.calibrate(q, calib)
        rows.append({"setting": f"16-bit {name}", "accuracy": accuracy(q), "quantizers": len(wide)})
        log(rows[-1])
        for n in wide:
            quantizers[n].set_bits(8)
    for act_range in ("percentile", "mse") if args.range_rows else ():
        for residual_bits in (8, 16):
            q = hessq.quantize(model, plan, calib, pin_first_last=None, act_range=act_range, residual_bits=residual_bits)
            rows.append({"setting": f"W8A8, {act_range} ranges, {residual_bits}-bit residual stream", "accuracy": accuracy(q)})
            log(rows[-1])
    res = {"command": command_line(), "machine": machine(), "task": args.task, "test_texts": sum(len(b["labels"]) for b in test),
           "rows": rows}
    lines = [f"# W8A8 MiniLM on {args.task}: which activations cost accuracy", "",
             f"`{res['command']}` on {res['machine']}; the first {res['test_texts']} test texts, fake-quantized model.", "",
             "| setting | quantizers at 16 bits | accuracy |", "|---|---:|---:|"]
    lines += [f"| {r['setting']} | {r.get('quantizers', '-') if r['setting'].startswith('16') else '-'} | {r['accuracy']:.2f} |"
              for r in rows]
    write_results(args.out / f"qbert_activations_{args.task}.json", res, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
