"""4-bit MatMulNBits against int8 on ONNX Runtime, by the number of token rows (issue 17's latency premise).

A latency-limited plan can only be faster than W8A8 where a 4-bit kernel beats the int8 one. This times the
kernels each of hessq's export paths puts on one MiniLM Linear, alone, on the same inputs and threads, at 1 to 256
token rows (batch × sequence length):
- hessq int8: ``MatMulIntegerToFloat``, uint8 activations at a static scale, int8 weights per output channel
  (the fast export's 8-bit Linear);
- hessq 4-bit: ``MatMulNBits``, float input, 4-bit weights in blocks of 128, ``accuracy_level`` 4 (int8 compute,
  the fast export's 2–4-bit Linear, built by the same ``hessq.ops.linear.nbits_weight``);
- ONNX Runtime ``quantize_dynamic``'s int8: ``DynamicQuantizeMatMul`` (what its DynamicQuantizeLinear + MatMulInteger
  fuse to), activations quantized in the graph at every call;
- float32 ``MatMul``.

Each at MiniLM's three shapes (384→384: query, key, value, output; 384→1536; 1536→384), timed interleaved (one run
of each kernel in turn, the order shuffled every round, medians). "Stack" sums the medians over MiniLM's 36 encoder
Linears (6 layers × (4 × 384→384 + 384→1536 + 1536→384)).

    python bench/nbits_rows.py [--threads 2] [--repeats 300] [--rows 1 4 16 64 256]

Writes bench/results/nbits_rows.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from hessq.ops.linear import nbits_weight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, git_commit, interleaved_ms, log, machine, ratio, write_results  # noqa: E402

SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (in, out)
STACK = {(384, 384): 24, (384, 1536): 6, (1536, 384): 6}  # MiniLM's 36 encoder Linears
KERNELS = ("hessq int8 (MatMulIntegerToFloat)", "hessq 4-bit (MatMulNBits)",
           "quantize_dynamic int8 (DynamicQuantizeMatMul)", "float32 MatMul")


def kernel_model(kernel: str, k: int, n: int, seed: int = 0):
    """A one-node ONNX model of ``kernel`` on a [rows, k] input and an n × k weight, and its input dtype."""
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(-7, 8, (n, k)).astype(np.int64))
    x_type, inits = TensorProto.FLOAT, {}
    if kernel.startswith("hessq int8"):
        x_type = TensorProto.UINT8
        inits = {"w": codes.numpy().astype(np.int8).T.copy(), "xs": np.float32(0.05),
                 "ws": np.full(n, 0.01, np.float32), "xz": np.uint8(128)}
        node = helper.make_node("MatMulIntegerToFloat", ["x", "w", "xs", "ws", "xz"], ["y"], domain="com.microsoft")
    elif kernel.startswith("hessq 4-bit"):
        packed, attrs = nbits_weight(codes)
        inits = {"w": packed, "s": np.full(n * packed.shape[1], 0.01, np.float32)}
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", **attrs)
    elif kernel.startswith("quantize_dynamic"):
        inits = {"w": codes.numpy().astype(np.int8).T.copy(), "ws": np.full(n, 0.01, np.float32)}
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "ws"], ["y"], domain="com.microsoft")
    else:
        inits = {"w": (codes.numpy().T * 0.01).astype(np.float32)}
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "linear", [helper.make_tensor_value_info("x", x_type, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
                              [numpy_helper.from_array(np.asarray(v), name) for name, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), x_type


def timed(rows: int, k: int, n: int, threads: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of every kernel at ``rows`` × ``k``, interleaved."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    rng = np.random.default_rng(rows)
    x_u8 = rng.integers(0, 256, (rows, k), dtype=np.uint8)
    x_f32 = (x_u8.astype(np.float32) - 128) * 0.05
    runs = {}
    for kernel in KERNELS:
        proto, x_type = kernel_model(kernel, k, n)
        session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feed = {"x": x_u8 if x_type == TensorProto.UINT8 else x_f32}
        runs[kernel] = lambda session=session, feed=feed: session.run(None, feed)
    return interleaved_ms(runs, repeats, seed=rows * 7919 + k, warmup=5)


def markdown(meta: dict, results: list[dict]) -> str:
    lines = ["# 4-bit MatMulNBits against int8 on ONNX Runtime, by token rows", "",
             f"{meta['machine']} ({meta['isa']}); onnxruntime {meta['onnxruntime']} (commit {meta['commit']}). "
             f"`{meta['command']}`", "",
             f"Median milliseconds of one MiniLM Linear alone, the kernels timed in turn within each round in an order "
             f"shuffled every round ({meta['repeats']} rounds); rows = batch × sequence length. *Stack*: the sum over "
             "MiniLM's 36 encoder Linears. *4-bit / int8*: MatMulNBits' time over hessq int8's (below 1: 4 bits pay).",
             "", "| rows | Linear (in→out) | " + " | ".join(KERNELS) + " | 4-bit / int8 |",
             "|---:|---|" + "---:|" * (len(KERNELS) + 1)]
    for r in results:
        cells = " | ".join(f"{r['ms'][kernel]:.4f}" for kernel in KERNELS)
        bold = "**" if r["shape"] == "stack" else ""
        lines.append(f"| {r['rows']} | {bold}{r['shape']}{bold} | {cells} | {bold}{r['nbits_over_int8']:.2f}{bold} |")
    lines += ["", meta["summary"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    args = ap.parse_args()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = ", ".join(f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2") if f" {f}" in flags) or "unknown ISA"
    results = []
    for rows in args.rows:
        stack = dict.fromkeys(KERNELS, 0.0)
        for k, n in SHAPES:
            ms = timed(rows, k, n, args.threads, args.repeats)
            for kernel in KERNELS:
                stack[kernel] += STACK[(k, n)] * ms[kernel]
            results.append({"rows": rows, "shape": f"{k}→{n}", "ms": ms,
                            "nbits_over_int8": ratio(ms[KERNELS[1]], ms[KERNELS[0]])})
            log(f"rows {rows:4d} {k}→{n}: " + ", ".join(f"{kernel.split(' (')[0]} {v:.4f}" for kernel, v in ms.items()))
        results.append({"rows": rows, "shape": "stack", "ms": stack, "nbits_over_int8": ratio(stack[KERNELS[1]], stack[KERNELS[0]])})
    stacks = [r for r in results if r["shape"] == "stack"]
    paying = [r["rows"] for r in stacks if r["nbits_over_int8"] < 1]
    summary = (f"MatMulNBits beats hessq's int8 over the whole stack at {', '.join(map(str, paying))} rows"
               if paying else "MatMulNBits beats hessq's int8 over the whole stack at none of these row counts")
    summary += "; its time over int8's: " + ", ".join(f"{r['nbits_over_int8']:.2f} at {r['rows']}" for r in stacks) + "."
    meta = {"machine": machine(args.threads), "isa": isa, "onnxruntime": ort.__version__, "commit": git_commit(),
            "command": command_line(), "repeats": args.repeats, "threads": args.threads, "summary": summary}
    write_results(RESULTS / "nbits_rows.json", {"meta": meta, "results": results}, markdown(meta, results))
    log(summary)


if __name__ == "__main__":
    main()
