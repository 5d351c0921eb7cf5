"""hessq's fast W8A8 MiniLM against ONNX Runtime's ``quantize_dynamic`` int8, two sessions only: each timed alone
(warm caches) and the two interleaved, at batch 1 and 32.

bench/ibert.py interleaves seven sessions in one process, so every run starts with the other six sessions' weights
in the caches: a cold-cache latency. This separates the two models' own speed from that.

    python bench/ibert_pair.py [--task tweets|bbc] [--threads 2] [--repeats 60]

Writes bench/results/ibert_pair_TASK.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

import hessq
from hessq.graph import quantizable_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, git_commit, log, machine, ort_session, ratio, write_results  # noqa: E402
from _text import export_classifier_onnx, ort_quantize_dynamic  # noqa: E402
from ibert import BATCHES, sessions_ms  # noqa: E402
from qbert import TASKS, data  # noqa: E402

QDYN, W8 = "ONNX Runtime quantize_dynamic int8", "hessq fast W8A8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=list(TASKS), default="tweets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=60, help="rounds at batch 1 (a third at batch 32)")
    ap.add_argument("--calibration-batches", type=int, default=4)
    args = ap.parse_args()
    length, train_batch = TASKS[args.task]
    model = hessq.models.minilm_finetuned(args.task, progress=True)
    calib = [b for _, b in zip(range(args.calibration_batches), data(args.task, "train", batch_size=train_batch, shuffle=False))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_classifier_onnx(model, tmp / "fp32.onnx", length)
        ort_quantize_dynamic(tmp / "fp32.onnx", tmp / "qdyn.onnx")
        q = hessq.quantize(model, {n: 8 for n in quantizable_layers(model)}, calib, pin_first_last=None)
        hessq.export_onnx(hessq.to_integer(q, input_shape=(length,)), tmp / "w8.onnx", mode="fast")
        sessions = {QDYN: ort_session(tmp / "qdyn.onnx", args.threads), W8: ort_session(tmp / "w8.onnx", args.threads)}
        rows = []
        for batch in BATCHES:
            repeats = args.repeats if batch == 1 else max(5, args.repeats // 3)
            alone = {k: sessions_ms({k: s}, batch, length, repeats)[k] for k, s in sessions.items()}
            both = sessions_ms(sessions, batch, length, repeats)
            for how, ms in (("alone", alone), ("the two interleaved", both)):
                rows.append({"batch": batch, "timing": how, **{f"ms {k}": v for k, v in ms.items()},
                             "speedup": ratio(ms[QDYN], ms[W8])})
                log(f"batch {batch}, {how}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    meta = {"machine": machine(args.threads), "onnxruntime": ort.__version__, "commit": git_commit(),
            "command": command_line(), "task": args.task, "length": length, "repeats": args.repeats}
    lines = [f"# hessq fast W8A8 against quantize_dynamic, two sessions ({args.task}, T={length})", "",
             f"{meta['machine']}; onnxruntime {meta['onnxruntime']} (commit {meta['commit']}). `{meta['command']}`", "",
             "Median milliseconds; *alone*: one session run back to back (warm caches); *the two interleaved*: one "
             "run of each in turn, the order shuffled every round. Speed-up = quantize_dynamic's time / hessq's.", "",
             f"| batch | timing | {QDYN} | {W8} | speed-up |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['timing']} | {r['ms ' + QDYN]:.2f} | {r['ms ' + W8]:.2f} | {r['speedup']:.2f} |" for r in rows]
    write_results(RESULTS / f"ibert_pair_{args.task}.json", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    log(f"wrote bench/results/ibert_pair_{args.task}.json and .md")


if __name__ == "__main__":
    main()
