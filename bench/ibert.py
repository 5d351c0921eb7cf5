"""Integer-only MiniLM (issue 17), latency part: hessq's fast ONNX export against ONNX Runtime's own int8 and FP32,
side by side in one run, on the tweets task (T=64).

Rows, each an ONNX Runtime session on ``--threads`` intra-op threads, timed interleaved (one run of each in turn,
``--repeats`` rounds, medians) at batch 1 and 32, every sequence 64 tokens (the last quarter padding):
- hessq fast W8A8: every Linear layer 8-bit (MatMulIntegerToFloat with static activation scales);
- hessq fast W4A8: every Linear layer 4-bit (MatMulNBits, block 128, accuracy_level 4), embeddings 8-bit;
- hessq fast, latency plan: each Linear layer at 4 bits where the layer's measured latency table (batch 1) says
  MatMulNBits is faster than the int8 kernel, else 8 (no sensitivity: a latency-only choice);
- ONNX Runtime ``quantize_dynamic`` int8 and FP32 of the same fine-tuned model (bench/_text.py).

Agreement of each hessq fast export with its integer model (``hessq.IntegerModel``) on the first ``--test-limit``
test tweets: the fraction of equal top classes and the largest logit difference; test accuracy of every row.

    python bench/ibert.py [--threads 2] [--repeats 40] [--test-limit 512]

Writes bench/results/ibert_latency.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import hessq
from hessq.graph import quantizable_layers
from hessq.integer import measure_latency_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, git_commit, log, machine, ort_session, ratio, write_results  # noqa: E402
from _text import INPUT_NAMES, example_inputs, export_classifier_onnx, ort_quantize_dynamic  # noqa: E402

LENGTH = 64
BATCHES = (1, 32)


def pad_ids(ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(ids, (0, LENGTH - ids.shape[1]))


def feeds(session, batch: int) -> dict[str, np.ndarray]:
    """The session's inputs at ``batch`` × 64 tokens: hessq's graphs take the ids alone (the mask is computed)."""
    inputs = example_inputs(batch, LENGTH)
    names = [i.name for i in session.get_inputs()]
    if names == ["input"]:
        return {"input": inputs["input_ids"].numpy()}
    return {n: inputs[n].numpy() for n in INPUT_NAMES}


def interleaved_ms(sessions: dict[str, object], batch: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each session, one run of each in turn per round (shared-machine noise hits all alike)."""
    fs = {k: feeds(s, batch) for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        s.run(None, fs[k])
        s.run(None, fs[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, fs[k])
            times[k].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def logits(session, batches) -> np.ndarray:
    out = []
    for b in batches:
        ids = pad_ids(b["input_ids"])
        f = {"input": ids.numpy()} if [i.name for i in session.get_inputs()] == ["input"] else \
            {"input_ids": ids.numpy(), "attention_mask": (ids != 0).long().numpy()}
        out.append(session.run(None, f)[0])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40, help="timing rounds at batch 1 (a quarter at batch 32)")
    parser.add_argument("--test-limit", type=int, default=512)
    parser.add_argument("--calibration-batches", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = hessq.models.minilm_finetuned("tweets")
    calib = [b for _, b in zip(range(args.calibration_batches), hessq.data.tweets("train", batch_size=32, shuffle=False))]
    test = [b for _, b in zip(range(-(-args.test_limit // 64)), hessq.data.tweets("test", batch_size=64))]
    labels = np.concatenate([b["labels"].numpy() for b in test])
    layers = quantizable_layers(model)
    linears = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear)]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_classifier_onnx(model, tmp / "fp32.onnx", LENGTH)
        ort_quantize_dynamic(tmp / "fp32.onnx", tmp / "qdyn.onnx")
        paths = {"ONNX Runtime quantize_dynamic int8": tmp / "qdyn.onnx", "ONNX Runtime FP32": tmp / "fp32.onnx"}
        imodels: dict[str, hessq.IntegerModel] = {}

        def build(name: str, plan: dict[str, int]) -> hessq.IntegerModel:
            log(f"quantize {name}")
            q = hessq.quantize(model, plan, calib, pin_first_last=None)
            im = hessq.to_integer(q, input_shape=(LENGTH,))
            path = tmp / f"{len(imodels)}.onnx"
            hessq.export_onnx(im, path, mode="fast")
            imodels[name], paths[name] = im, path
            return im

        w8 = build("hessq fast W8A8", {n: 8 for n in layers})
        build("hessq fast W4A8", {n: 4 if n in linears else 8 for n in layers})
        log("latency table of the W8A8 model at batch 1")
        table = measure_latency_table(w8, batch_size=1, repeats=20, threads=args.threads)
        chosen = {n: 4 if n in table and table[n][4] < table[n][8] else 8 for n in linears}
        four = sorted(n for n, b in chosen.items() if b == 4)
        log(f"latency plan: {len(four)} of {len(linears)} Linear layers at 4 bits")
        if 0 < len(four) < len(linears):
            build("hessq fast, latency plan", {n: chosen.get(n, 8) for n in layers})
        sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
        for k, p in paths.items():
            rows[k] = {"setting": k, "onnx_mb": p.stat().st_size / 1e6}
        for batch in BATCHES:
            log(f"latency at batch {batch}")
            ms = interleaved_ms(sessions, batch, args.repeats if batch == 1 else max(5, args.repeats // 4))
            for k, v in ms.items():
                rows[k][f"ms_b{batch}"] = v
        base = "ONNX Runtime quantize_dynamic int8"
        for k, r in rows.items():
            for batch in BATCHES:
                r[f"speedup_vs_quantize_dynamic_b{batch}"] = ratio(rows[base][f"ms_b{batch}"], r[f"ms_b{batch}"])
        log("accuracy and agreement")
        for k, s in sessions.items():
            y = logits(s, test)
            rows[k]["test_accuracy"] = float((y.argmax(1) == labels).mean())
            if k in imodels:
                y_int = torch.cat([imodels[k](pad_ids(b["input_ids"]).float()) for b in test]).numpy()
                rows[k]["integer_test_accuracy"] = float((y_int.argmax(1) == labels).mean())
                rows[k]["top1_agreement_with_integer"] = float((y.argmax(1) == y_int.argmax(1)).mean())
                rows[k]["max_abs_logit_diff_vs_integer"] = float(np.abs(y - y_int).max())
                rows[k]["max_abs_logit_integer"] = float(np.abs(y_int).max())
    meta = {"machine": machine(args.threads), "threads": args.threads, "onnxruntime": ort.__version__,
            "hessq": hessq.__version__, "commit": git_commit(), "command": command_line(), "task": "tweets",
            "length": LENGTH, "test_texts": int(len(labels)), "statistic": "median milliseconds, interleaved",
            "latency_plan_4bit_layers": four, "latency_table_batch": 1}
    write_results(RESULTS / "ibert_latency.json", {"meta": meta, "rows": list(rows.values())}, markdown(meta, rows))
    log(f"wrote {RESULTS / 'ibert_latency'}.json and .md")


def markdown(meta: dict, rows: dict[str, dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["# Integer-only MiniLM on ONNX Runtime: latency (tweets, T=64)", "",
             f"{meta['machine']}; onnxruntime {meta['onnxruntime']}, hessq {meta['hessq']} (commit {meta['commit']}). "
             f"`{meta['command']}`", "",
             f"Median milliseconds of one run, the sessions timed in turn within each round; speed-up = "
             f"quantize_dynamic's time / the row's (above 1: faster). Agreement: the fast export against its integer "
             f"model on {meta['test_texts']} test tweets. The latency plan put {len(meta['latency_plan_4bit_layers'])} "
             "Linear layers at 4 bits (MatMulNBits faster than int8 in the batch-1 latency table).", "",
             "| setting | ms b=1 | ms b=32 | speed-up b=1 | speed-up b=32 | ONNX MB | test acc. (%) | top-1 = integer | "
             "max Δlogit |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        agree = r.get("top1_agreement_with_integer")
        lines.append(f"| {r['setting']} | {r['ms_b1']:.2f} | {r['ms_b32']:.1f} | {r['speedup_vs_quantize_dynamic_b1']:.2f} | "
                     f"{r['speedup_vs_quantize_dynamic_b32']:.2f} | {r['onnx_mb']:.1f} | {100 * r['test_accuracy']:.2f} | "
                     f"{f(None if agree is None else 100 * agree, '.2f')}{'%' if agree is not None else ''} | "
                     f"{f(r.get('max_abs_logit_diff_vs_integer'), '.3f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
