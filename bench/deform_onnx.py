"""The rounded deformable conv on ONNX Runtime: hessq's gather graphs against ONNX Runtime's own DeformConv.

A CoDeNet block (3×3 depthwise deformable conv with offsets bounded to ±8 and rounded, ReLU, 1×1 conv) on a
C×128×128 feature map at batch 1, W8A8, exported three ways:
  - hessq exact: ConvInteger offset branch, float64 rounding, GatherElements of the codes, ConvInteger (bit-exact);
  - hessq fast: the same gather, then the conv family's fused QLinearConv;
  - DeformConv: a float opset-19 graph (ONNX Runtime's DeformConv, CPU from 1.25) with the fake-quant weights,
    the offsets rounded by Floor(x + 0.5).
Median latency, and agreement with the integer model (max abs difference, fraction of equal outputs).

    python bench/deform_onnx.py [--channels 32] [--size 128] [--threads 1] [--repeats 50]

Writes bench/results/deform_onnx.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import hessq
from hessq.nn import DeformConv2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, git_commit, log, machine, ort_ms, write_results  # noqa: E402


def block(channels: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(DeformConv2d(channels, channels, 3, 1, 1, groups=channels, offset_bound=8, round_offsets=True),
                          nn.ReLU(), nn.Conv2d(channels, channels, 1))
    nn.init.normal_(model[0].offset.weight, std=0.3)
    nn.init.uniform_(model[0].offset.bias, -3, 3)
    return model.eval()


def deformconv_graph(q, path: Path, shape: tuple[int, ...]) -> None:
    """The quantized block as a float opset-19 graph around ONNX Runtime's DeformConv."""
    dc, head = q.get_submodule("0"), q.get_submodule("2")
    q_in = dc.act_quantizer
    with torch.no_grad():
        w_off = dc.offset_quantizer(dc.offset_weight).numpy()
        b_off = dc.offset_bias.numpy()  # the int32-grid rounding of a bias is far below a pixel
        w, b = (t.numpy() for t in dc.quantized_weight_and_bias())
        w_head, b_head = (t.numpy() for t in head.quantized_weight_and_bias())
    c = shape[0]
    inits = {"s_in": np.float32(q_in.scale), "zp": np.int8(0) if bool(q_in.signed) else np.uint8(0), "w_off": w_off,
             "b_off": b_off, "lo": np.float32(-8), "hi": np.float32(8), "half": np.float32(0.5), "w": w, "b": b,
             "w_head": w_head, "b_head": b_head, "s_mid": np.float32(head.act_quantizer.scale), "zp_mid": np.uint8(0)}
    conv = dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s_in", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s_in", "zp"], ["x"]),
        helper.make_node("Conv", ["x", "w_off", "b_off"], ["raw"], **conv),
        helper.make_node("Clip", ["raw", "lo", "hi"], ["bounded"]),
        helper.make_node("Add", ["bounded", "half"], ["biased"]),
        helper.make_node("Floor", ["biased"], ["offsets"]),
        helper.make_node("DeformConv", ["x", "w", "offsets", "b"], ["deformed"], group=c, offset_group=1,
                         kernel_shape=[3, 3], **conv),
        helper.make_node("Relu", ["deformed"], ["relu"]),
        helper.make_node("QuantizeLinear", ["relu", "s_mid", "zp_mid"], ["mid_q"]),
        helper.make_node("DequantizeLinear", ["mid_q", "s_mid", "zp_mid"], ["mid"]),
        helper.make_node("Conv", ["mid", "w_head", "b_head"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "deformconv_block", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *shape])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *shape])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], producer_name="hessq-bench")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def run(path: Path, x: np.ndarray, threads: int) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.channels, args.size, args.size)
    model = block(args.channels)
    g = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(2, *shape, generator=g),) for _ in range(2)]
    q = hessq.quantize(model, 8, calibration, pin_first_last=None)
    imodel = hessq.to_integer(q)
    x = torch.randn(1, *shape, generator=g)
    y_int = imodel(x).numpy()
    # the output is the head's dequantized accumulator: one step is its per-channel scale
    head = next(op for op in imodel.ops if op.output == imodel.ops[-1].inputs[0])
    step = head.scale.numpy().reshape(1, -1, 1, 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"hessq exact (gather + ConvInteger)": Path(tmp) / "exact.onnx",
                 "hessq fast (gather + QLinearConv)": Path(tmp) / "fast.onnx",
                 "DeformConv (float, opset 19)": Path(tmp) / "deformconv.onnx"}
        hessq.export_onnx(imodel, paths["hessq exact (gather + ConvInteger)"], mode="exact")
        hessq.export_onnx(imodel, paths["hessq fast (gather + QLinearConv)"], mode="fast")
        deformconv_graph(q, paths["DeformConv (float, opset 19)"], shape)
        for name, path in paths.items():
            y = run(path, x.numpy(), args.threads)
            ms = ort_ms(path, shape, 1, args.repeats, args.threads)
            diff = np.abs(y - y_int)
            steps = np.rint(diff / step)
            rows.append({"export": name, "ms": ms, "max_abs_diff": float(diff.max()), "max_diff_steps": float(steps.max()),
                         "equal_fraction": float((y == y_int).mean()), "within_one_step": float((steps <= 1).mean())})
            log(f"{name}: {ms:.2f} ms, max |diff| {diff.max():.3g}, equal {rows[-1]['equal_fraction']:.4f}")
    data = {"machine": machine(args.threads), "command": command_line(), "commit": git_commit(), "shape": [1, *shape],
            "onnxruntime": ort.__version__, "rows": rows}
    md = [f"# Rounded deformable conv block on ONNX Runtime ({args.channels}×{args.size}×{args.size}, batch 1, W8A8)", "",
          f"{data['machine']}; onnxruntime {ort.__version__}; `{data['command']}` at {data['commit']}.", "",
          "| export | median ms | max abs diff vs integer model | (output steps) | equal outputs | within one step |",
          "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['export']} | {r['ms']:.2f} | {r['max_abs_diff']:.3g} | {r['max_diff_steps']:.0f} | {r['equal_fraction']:.2%} | "
           f"{r['within_one_step']:.2%} |" for r in rows]
    md += ["", "Output steps: the head's accumulator scale per channel. Where the fast graphs differ by more than a "
           "step, their input codes differ: QuantizeLinear on a signed grid (uint8, zero-point 128) saturates at −128 "
           "where hessq's symmetric codes stop at −127 (the inputs below the calibrated range, 0.01% here). The "
           "offsets computed from a different code can round to another pixel, and that pixel is gathered."]
    write_results(RESULTS / "deform_onnx.json", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
