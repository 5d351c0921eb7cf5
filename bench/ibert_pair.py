"""hessq's fast W8A8 MiniLM against ONNX Runtime's ``quantize_dynamic`` int8, at batch 1 and 32, on the same inputs
and threads, three sessions only: ``quantize_dynamic``, hessq's default fast export, and hessq's export with
``fuse_siblings=False`` (query, key and value as three MatMulIntegerToFloat instead of one).

Two timings, in one run:
- *interleaved, spinning off*: the three sessions in one process, one run of each in turn, the order shuffled every
  round, ONNX Runtime's ``session.intra_op.allow_spinning`` off (bench/_common.ort_session says why);
- *alone, spinning on*: ONNX Runtime's default session options, each session created alone, timed back to back and
  released before the next is created, in ``--rotations`` rotations; the median of the rotations' medians.

bench/ibert.py interleaves seven sessions in one process; this separates the two backends' own speed from that.

    python bench/ibert_pair.py [--task tweets|bbc] [--threads 2] [--repeats 60] [--rotations 3]

Writes bench/results/ibert_pair_TASK.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
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

QDYN, W8, W8_UNFUSED = "ONNX Runtime quantize_dynamic int8", "hessq fast W8A8", "hessq fast W8A8, fuse_siblings=False"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=list(TASKS), default="tweets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=60, help="rounds at batch 1 (a quarter at batch 32)")
    ap.add_argument("--rotations", type=int, default=3, help="rotations of the sessions timed alone")
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
        imodel = hessq.to_integer(q, input_shape=(length,))
        hessq.export_onnx(imodel, tmp / "w8.onnx", mode="fast")
        hessq.export_onnx(imodel, tmp / "w8_unfused.onnx", mode="fast", fuse_siblings=False)
        paths = {QDYN: tmp / "qdyn.onnx", W8: tmp / "w8.onnx", W8_UNFUSED: tmp / "w8_unfused.onnx"}
        rows = []
        for batch in BATCHES:
            repeats = args.repeats if batch == 1 else max(5, args.repeats // 4)
            sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
            interleaved = sessions_ms(sessions, batch, length, repeats)
            del sessions
            per_rotation: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(args.rotations):
                for k, p in paths.items():
                    session = ort_session(p, args.threads, spinning=True)
                    per_rotation[k].append(sessions_ms({k: session}, batch, length, repeats)[k])
                    del session
            alone = {k: statistics.median(v) for k, v in per_rotation.items()}
            for how, ms in (("interleaved, spinning off", interleaved), ("alone, spinning on", alone)):
                rows.append({"batch": batch, "timing": how, **{f"ms {k}": v for k, v in ms.items()},
                             "speedup": ratio(ms[QDYN], ms[W8]), "speedup unfused": ratio(ms[QDYN], ms[W8_UNFUSED]),
                             **({"rotations": per_rotation} if how.startswith("alone") else {})})
                log(f"batch {batch}, {how}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    meta = {"machine": machine(args.threads), "onnxruntime": ort.__version__, "commit": git_commit(),
            "command": command_line(), "task": args.task, "length": length, "repeats": args.repeats,
            "rotations": args.rotations}
    lines = [f"# hessq fast W8A8 against quantize_dynamic ({args.task}, T={length})", "",
             f"{meta['machine']}; onnxruntime {meta['onnxruntime']} (commit {meta['commit']}). `{meta['command']}`", "",
             "Median milliseconds on the same inputs and threads. *Interleaved, spinning off*: the three sessions in "
             "one process, one run of each in turn, ONNX Runtime's intra-op spinning off. *Alone, spinning on*: "
             "ONNX Runtime's default options, one session at a time, the median of "
             f"{args.rotations} rotations' medians. Speed-up = quantize_dynamic's time / hessq's.", "",
             f"| batch | timing | {QDYN} | {W8} | {W8_UNFUSED} | speed-up | speed-up, unfused |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['timing']} | {r['ms ' + QDYN]:.2f} | {r['ms ' + W8]:.2f} | "
              f"{r['ms ' + W8_UNFUSED]:.2f} | {r['speedup']:.2f} | {r['speedup unfused']:.2f} |" for r in rows]
    write_results(RESULTS / f"ibert_pair_{args.task}.json", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    log(f"wrote bench/results/ibert_pair_{args.task}.json and .md")


if __name__ == "__main__":
    main()
