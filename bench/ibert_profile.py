"""Where the time of an integer-only MiniLM goes on ONNX Runtime: kernel milliseconds per op type of hessq's fast
W8A8 export against ONNX Runtime's ``quantize_dynamic`` int8, from ONNX Runtime's own profiler, in one run.

Both graphs run ``--runs`` times on the same batch (``example_inputs``: the last quarter of each text padding) on
``--threads`` intra-op threads; each op type's kernel time is summed per run and averaged. This is the table that
showed the attention mask's ``Where`` over every score costing 4× the Softmax at T=256, batch 32.

    python bench/ibert_profile.py [--task bbc|tweets] [--batch 32] [--threads 2] [--runs 3]

Writes bench/results/ibert_profile_TASK.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import hessq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, git_commit, log, machine, write_results  # noqa: E402
from _text import example_inputs, export_classifier_onnx, ort_quantize_dynamic  # noqa: E402
from qbert import TASKS, data  # noqa: E402


def profile_ms(path: Path, feeds: dict, threads: int, runs: int, prefix: Path) -> dict[str, float]:
    """Mean kernel milliseconds per run of each op type, from ONNX Runtime's profiler (the first run not counted)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling, opts.profile_file_prefix = True, str(prefix)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: feeds[i.name] for i in session.get_inputs()}
    for _ in range(runs + 1):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm = first["ts"] + first["dur"]
    totals: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= warm:
            totals[e["args"]["op_name"]] += e["dur"] / 1000 / runs
    return dict(totals.most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=list(TASKS), default="bbc")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calibration-batches", type=int, default=2)
    args = ap.parse_args()
    length, train_batch = TASKS[args.task]
    model = hessq.models.minilm_finetuned(args.task, progress=True)
    calib = [b for _, b in zip(range(args.calibration_batches), data(args.task, "train", batch_size=train_batch, shuffle=False))]
    inputs = example_inputs(args.batch, length)
    feeds = {"input": inputs["input_ids"].numpy(), **{k: v.numpy() for k, v in inputs.items()}}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log("quantize W8A8 and export")
        q = hessq.quantize(model, 8, calib, pin_first_last=None)
        hessq.export_onnx(hessq.to_integer(q, input_shape=(length,)), tmp / "fast.onnx", mode="fast")
        export_classifier_onnx(model, tmp / "fp32.onnx", length)
        ort_quantize_dynamic(tmp / "fp32.onnx", tmp / "qdyn.onnx")
        for name, path in (("hessq fast W8A8", tmp / "fast.onnx"), ("ONNX Runtime quantize_dynamic int8", tmp / "qdyn.onnx")):
            log(f"profile {name}")
            rows[name] = profile_ms(path, feeds, args.threads, args.runs, tmp / "profile")
    meta = {"machine": machine(args.threads), "command": command_line(), "commit": git_commit(),
            "onnxruntime": ort.__version__, "task": args.task, "length": length, "batch": args.batch,
            "runs": args.runs, "statistic": "mean kernel milliseconds per run, per op type"}
    stem = RESULTS / f"ibert_profile_{args.task}"
    write_results(stem.with_suffix(".json"), {"meta": meta, "rows": rows}, markdown(meta, rows))
    log(f"wrote {stem}.json and .md")


def markdown(meta: dict, rows: dict[str, dict[str, float]]) -> str:
    lines = [f"# Where the time goes: MiniLM {meta['task']}, T={meta['length']}, batch {meta['batch']}", "",
             f"{meta['machine']}; onnxruntime {meta['onnxruntime']} (commit {meta['commit']}). `{meta['command']}`", "",
             f"Kernel milliseconds per op type, mean of {meta['runs']} profiled runs (ONNX Runtime's profiler).", ""]
    for name, ops in rows.items():
        lines += [f"## {name}: {sum(ops.values()):.1f} ms", "", "| op type | ms |", "|---|---:|"]
        lines += [f"| {op} | {ms:.1f} |" for op, ms in list(ops.items())[:12]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
