"""Integer-only MiniLM (issue 17), latency part: hessq's fast ONNX export against ONNX Runtime's own int8 and FP32,
side by side in one run, on one task: tweets (T=64, the default) or BBC News (``--task bbc``, T=256).

Rows, each an ONNX Runtime session on ``--threads`` intra-op threads, timed interleaved (one run of each in turn,
``--repeats`` rounds, medians) at batch 1 and 32, every sequence the task's length (the last quarter padding):
- hessq fast W8A8: every Linear layer 8-bit (MatMulIntegerToFloat with static activation scales);
- hessq fast W4A8: every Linear layer 4-bit (MatMulNBits, block 128, accuracy_level 4), embeddings 8-bit;
- hessq fast, fastest plan: each Linear layer at 4 bits where the layer's measured latency table (batch 1) says
  MatMulNBits is faster than the int8 kernel, else 8 (no sensitivity: a latency-only choice);
- Hessian latency-limited plan: ``plan_bits`` over 4 and 8 bits with ``latency_limit`` halfway from W8A8's summed
  table latency to the fastest plan's, Ω from the Hessian traces of ``--sensitivity`` (bench/qbert.py's file);
- Hessian size-limited plan: the 2–8-bit plan at an average of 3 weight bits from ``--mixed-plan`` (bench/qbert.py's
  qbert.json), post-training here (its accuracy after QAT is in qbert.md and ibert_exact.md);
- the same size-limited plan exported with ``narrow_kernels=`` the latency table: each layer on the kernel the
  table times faster (a 2–4-bit layer on the int8 kernel where MatMulNBits is slower), the same ``.hq`` file;
- ONNX Runtime ``quantize_dynamic`` int8 and FP32 of the same fine-tuned model (bench/_text.py).

Agreement of each hessq fast export with its integer model (``hessq.IntegerModel``) on the first ``--test-limit``
test texts: the fraction of equal top classes and the largest logit difference; test accuracy of every row, of the
integer model as well; the size of each row's ONNX file and of hessq's ``.hq`` file.

    python bench/ibert.py [--task tweets|bbc] [--threads 2] [--repeats 40] [--test-limit 512]
        [--sensitivity bench/results/qbert_sensitivity_TASK.json] [--mixed-plan bench/results/qbert_TASK.json]

Writes bench/results/ibert_latency.json and .md (tweets) or ibert_latency_bbc.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import hessq
from hessq.graph import quantizable_layers
from hessq.integer import measure_latency_table
from hessq.plan import plan_bits
from hessq.sensitivity import Sensitivity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, command_line, git_commit, interleaved_ms, log, machine, ort_session, ratio,  # noqa: E402
                     write_results)
from _text import INPUT_NAMES, example_inputs, export_classifier_onnx, ort_quantize_dynamic  # noqa: E402
from ibert_exact import mixed_bits  # noqa: E402
from qbert import TASKS, data  # noqa: E402

BATCHES = (1, 32)


def pad_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(ids, (0, length - ids.shape[1]))


def feeds(session, batch: int, length: int) -> dict[str, np.ndarray]:
    """The session's inputs at ``batch`` × ``length`` tokens: hessq's graphs take the ids alone (the mask is computed)."""
    inputs = example_inputs(batch, length)
    names = [i.name for i in session.get_inputs()]
    if names == ["input"]:
        return {"input": inputs["input_ids"].numpy()}
    return {n: inputs[n].numpy() for n in INPUT_NAMES}


def sessions_ms(sessions: dict[str, object], batch: int, length: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each ONNX Runtime session at ``batch`` × ``length``, interleaved
    (:func:`_common.interleaved_ms`)."""
    fs = {k: feeds(s, batch, length) for k, s in sessions.items()}
    return interleaved_ms({k: (lambda s=s, f=fs[k]: s.run(None, f)) for k, s in sessions.items()}, repeats, seed=batch)


def logits(session, batches, length: int) -> np.ndarray:
    out = []
    for b in batches:
        ids = pad_ids(b["input_ids"], length)
        f = {"input": ids.numpy()} if [i.name for i in session.get_inputs()] == ["input"] else \
            {"input_ids": ids.numpy(), "attention_mask": (ids != 0).long().numpy()}
        out.append(session.run(None, f)[0])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="tweets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40, help="timing rounds at batch 1 (a quarter at batch 32)")
    parser.add_argument("--test-limit", type=int, default=512)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--sensitivity", help="Hessian traces of the task's MiniLM (bench/qbert.py writes them; "
                        "default bench/results/qbert_sensitivity_TASK.json)")
    parser.add_argument("--mixed-plan", help="the qbert.json holding the size-limited Hessian plan "
                        "(default bench/results/qbert_TASK.json)")
    args = parser.parse_args()
    task = args.task
    args.sensitivity = args.sensitivity or str(RESULTS / f"qbert_sensitivity_{task}.json")
    args.mixed_plan = args.mixed_plan or str(RESULTS / f"qbert_{task}.json")
    length, train_batch = TASKS[task]
    torch.manual_seed(0)
    model = hessq.models.minilm_finetuned(task, progress=True)
    calib = [b for _, b in zip(range(args.calibration_batches), data(task, "train", batch_size=train_batch, shuffle=False))]
    test_batch = 64 if length <= 64 else 16  # the integer model holds int64 attention scores: B × 12 × T²
    test = [b for _, b in zip(range(-(-args.test_limit // test_batch)), data(task, "test", batch_size=test_batch))]
    labels = np.concatenate([b["labels"].numpy() for b in test])
    layers = quantizable_layers(model)
    linears = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear)]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_classifier_onnx(model, tmp / "fp32.onnx", length)
        ort_quantize_dynamic(tmp / "fp32.onnx", tmp / "qdyn.onnx")
        paths = {"ONNX Runtime quantize_dynamic int8": tmp / "qdyn.onnx", "ONNX Runtime FP32": tmp / "fp32.onnx"}
        imodels: dict[str, hessq.IntegerModel] = {}

        hq_mb: dict[str, float] = {}
        plans: dict[str, dict] = {}

        def build(name: str, plan: dict[str, int]) -> hessq.IntegerModel:
            log(f"quantize {name}")
            q = hessq.quantize(model, plan, calib, pin_first_last=None)
            im = hessq.to_integer(q, input_shape=(length,))
            path = tmp / f"{len(imodels)}.onnx"
            hessq.export_onnx(im, path, mode="fast")
            im.save(tmp / f"{len(imodels)}.hq")
            hq_mb[name] = (tmp / f"{len(imodels)}.hq").stat().st_size / 1e6
            imodels[name], paths[name] = im, path
            return im

        w8 = build("hessq fast W8A8", {n: 8 for n in layers})
        build("hessq fast W4A8", {n: 4 if n in linears else 8 for n in layers})
        log("latency table of the W8A8 model at batch 1")
        table = measure_latency_table(w8, batch_size=1, repeats=20, threads=args.threads, spinning=False)
        chosen = {n: 4 if n in table and table[n][4] < table[n][8] else 8 for n in linears}
        four = sorted(n for n, b in chosen.items() if b == 4)
        log(f"fastest plan: {len(four)} of {len(linears)} Linear layers at 4 bits")
        table_ms = {b: 1e3 * sum(table[n][b] for n in linears) for b in (4, 8, 32)}
        log("the Linear layers summed in the table: " + ", ".join(f"{b} bits {v:.2f} ms" for b, v in table_ms.items()))
        fastest = {n: chosen.get(n, 8) for n in layers}
        # the Hessian plan under a latency limit: halfway from W8A8's summed table time to the fastest plan's
        w8_s = sum(table[n][8] for n in layers if n in table)
        fastest_s = sum(table[n][fastest[n]] for n in layers if n in table)
        lat_bits = None
        if Path(args.sensitivity).is_file() and fastest_s < w8_s:
            limit = fastest_s + 0.5 * (w8_s - fastest_s)
            sens = Sensitivity.load(args.sensitivity)
            lat_plan = plan_bits(model, sens, weight_bits=(4, 8), latency_limit=limit, latency_table=table,
                                 pins={n: 8 for n in layers if n not in linears}, pin_first_last=None,
                                 input_shape=(length,))
            lat_bits = {n: lat_plan[n] for n in layers}
            plans["Hessian latency-limited"] = {"limit_ms": 1e3 * limit, "w8a8_table_ms": 1e3 * w8_s,
                                                "fastest_table_ms": 1e3 * fastest_s,
                                                "table_ms": 1e3 * lat_plan.latency,
                                                "bits_4": sorted(n for n in linears if lat_plan[n] == 4),
                                                "same_as_fastest": lat_bits == fastest}
            log(f"latency-limited Hessian plan: {len(plans['Hessian latency-limited']['bits_4'])} Linear layers at 4 "
                f"bits, {1e3 * lat_plan.latency:.3f} ms in the table (limit {1e3 * limit:.3f}, W8A8 {1e3 * w8_s:.3f})")
        else:
            log(f"no latency-limited Hessian plan: {args.sensitivity} missing or no layer faster at 4 bits")
        if lat_bits is not None and lat_bits == fastest:
            build("hessq fast, Hessian latency-limited plan (= fastest plan)", fastest)
        else:
            if 0 < len(four) < len(linears):
                build("hessq fast, fastest plan (latency only)", fastest)
            if lat_bits is not None:
                build("hessq fast, Hessian latency-limited plan", lat_bits)
        size_bits = mixed_bits(Path(args.mixed_plan), task)
        if size_bits is not None:
            plans["Hessian size-limited"] = {"average_bits_from": args.mixed_plan,
                                             "bits": {b: sum(v == b for v in size_bits.values()) for b in range(2, 9)}}
            sized = build("hessq fast, Hessian size-limited plan (avg 3 bits)", size_bits)
            # the same integer model, each layer on the kernel the latency table times faster (here int8 wherever
            # MatMulNBits is slower): the small .hq file at the int8 kernels' speed
            name = "hessq fast, Hessian size-limited plan, kernels by the latency table"
            paths[name] = tmp / "size_by_table.onnx"
            hessq.export_onnx(sized, paths[name], mode="fast", narrow_kernels=table)
            imodels[name], hq_mb[name] = sized, hq_mb["hessq fast, Hessian size-limited plan (avg 3 bits)"]
        else:
            log(f"no size-limited Hessian plan in {args.mixed_plan}: run bench/qbert.py --tasks {task} first")
        sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
        for k, p in paths.items():
            rows[k] = {"setting": k, "onnx_mb": p.stat().st_size / 1e6, "hq_mb": hq_mb.get(k)}
        for batch in BATCHES:
            log(f"latency at batch {batch}")
            ms = sessions_ms(sessions, batch, length, args.repeats if batch == 1 else max(5, args.repeats // 4))
            for k, v in ms.items():
                rows[k][f"ms_b{batch}"] = v
        base = "ONNX Runtime quantize_dynamic int8"
        for k, r in rows.items():
            for batch in BATCHES:
                r[f"speedup_vs_quantize_dynamic_b{batch}"] = ratio(rows[base][f"ms_b{batch}"], r[f"ms_b{batch}"])
        log("accuracy and agreement")
        for k, s in sessions.items():
            y = logits(s, test, length)
            rows[k]["test_accuracy"] = float((y.argmax(1) == labels).mean())
            if k in imodels:
                y_int = torch.cat([imodels[k](pad_ids(b["input_ids"], length).float()) for b in test]).numpy()
                rows[k]["integer_test_accuracy"] = float((y_int.argmax(1) == labels).mean())
                rows[k]["top1_agreement_with_integer"] = float((y.argmax(1) == y_int.argmax(1)).mean())
                rows[k]["max_abs_logit_diff_vs_integer"] = float(np.abs(y - y_int).max())
                rows[k]["max_abs_logit_integer"] = float(np.abs(y_int).max())
    meta = {"machine": machine(args.threads), "threads": args.threads, "onnxruntime": ort.__version__,
            "hessq": hessq.__version__, "commit": git_commit(), "command": command_line(), "task": task,
            "length": length, "test_texts": int(len(labels)), "statistic": "median milliseconds, interleaved",
            "latency_plan_4bit_layers": four, "latency_table_batch": 1, "plans": plans,
            "linear_layers_table_ms": table_ms, "repeats": args.repeats, "repeats_b32": max(5, args.repeats // 4)}
    stem = RESULTS / ("ibert_latency" if task == "tweets" else f"ibert_latency_{task}")
    write_results(stem.with_suffix(".json"), {"meta": meta, "rows": list(rows.values())}, markdown(meta, rows))
    log(f"wrote {stem}.json and .md")


def markdown(meta: dict, rows: dict[str, dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lat = meta["plans"].get("Hessian latency-limited")
    size = meta["plans"].get("Hessian size-limited")
    lines = [f"# Integer-only MiniLM on ONNX Runtime: latency ({meta['task']}, T={meta['length']})", "",
             f"{meta['machine']}; onnxruntime {meta['onnxruntime']}, hessq {meta['hessq']} (commit {meta['commit']}). "
             f"`{meta['command']}`", "",
             f"Median milliseconds of one run, the sessions timed in turn within each round, in an order shuffled "
             f"every round ({meta['repeats']} rounds at batch 1, {meta['repeats_b32']} at batch 32), ONNX Runtime's "
             f"intra-op spinning off in every session (bench/_common.ort_session says why); speed-up = "
             f"quantize_dynamic's time / the row's (above 1: faster). Agreement: the fast export against its integer "
             f"model on {meta['test_texts']} test texts; accuracies post-training, on those texts. The fastest plan "
             f"put {len(meta['latency_plan_4bit_layers'])} Linear layers at 4 bits (MatMulNBits faster than int8 in "
             "the batch-1 latency table)."]
    t = {int(b): v for b, v in meta["linear_layers_table_ms"].items()}
    lines.append(f"Summed over every Linear layer, the batch-1 latency table gives {t[8]:.2f} ms at 8 bits (int8 "
                 f"kernel), {t[4]:.2f} ms at 4 bits (MatMulNBits) and {t[32]:.2f} ms in float32.")
    if lat:
        lines.append(f"The Hessian latency-limited plan (`plan_bits(latency_limit=...)`, 4 or 8 bits per Linear) has "
                     f"{len(lat['bits_4'])} Linear layers at 4 bits ({', '.join(lat['bits_4'])}): {lat['table_ms']:.3f} ms "
                     f"summed in the table under a limit of {lat['limit_ms']:.3f} ms (W8A8 {lat['w8a8_table_ms']:.3f} ms, "
                     f"fastest plan {lat['fastest_table_ms']:.3f} ms)"
                     + ("; it is the fastest plan itself." if lat.get("same_as_fastest") else "."))
    if size:
        counts = ", ".join(f"{n} at {b}" for b, n in size["bits"].items() if n)
        lines.append(f"The Hessian size-limited plan (average 3 weight bits, from bench/qbert.py) has layers {counts} "
                     "bits; its 2–4-bit Linears run on MatMulNBits.")
    lines += ["", "| setting | ms b=1 | ms b=32 | speed-up b=1 | speed-up b=32 | ONNX MB | .hq MB | test acc. (%) | "
              "integer acc. (%) | top-1 = integer | max Δlogit |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        agree = r.get("top1_agreement_with_integer")
        integer = r.get("integer_test_accuracy")
        lines.append(f"| {r['setting']} | {r['ms_b1']:.2f} | {r['ms_b32']:.1f} | {r['speedup_vs_quantize_dynamic_b1']:.2f} | "
                     f"{r['speedup_vs_quantize_dynamic_b32']:.2f} | {r['onnx_mb']:.1f} | {f(r.get('hq_mb'), '.2f')} | "
                     f"{100 * r['test_accuracy']:.2f} | {f(None if integer is None else 100 * integer, '.2f')} | "
                     f"{f(None if agree is None else 100 * agree, '.2f')}{'%' if agree is not None else ''} | "
                     f"{f(r.get('max_abs_logit_diff_vs_integer'), '.3f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
