"""Per-layer latency measured on ONNX Runtime, in the table format the bit planner reads.

Each conv / linear layer of an IntegerModel is exported alone (uint8 activations, int8
per-channel weights: QLinearConv / MatMulInteger, as in the fast export) and timed at its
real input shape. ONNX Runtime executes every weight width from 2 to 8 bits with its int8
kernels (narrower codes are stored packed but computed as int8), so those widths share one
measured time; ``32`` holds the float32 time of the same layer for reference.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from hessq._errors import ConfigError
from hessq.integer._model import IntegerModel
from hessq.integer._onnx import _require_onnx
from hessq.plan import LatencyTable


def _session(proto, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _median_seconds(session, feed, repeats: int) -> float:
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layer_models(op, in_shape: list[int]):
    onnx, TP, helper, nh = _require_onnx()
    w = op.tensors["weight"].numpy().astype(np.int8)
    inits = [nh.from_array(w, "w")]
    f32 = [nh.from_array(w.astype(np.float32), "wf")]
    if op.kind == "conv2d":
        a = op.attrs
        attrs = dict(strides=a["stride"], pads=a["padding"] * 2, dilations=a["dilation"], group=a["groups"])
        inits += [
            nh.from_array(np.float32(0.02), "xs"), nh.from_array(np.uint8(0), "xz"),
            nh.from_array(np.full(w.shape[0], 0.01, np.float32), "ws"), nh.from_array(np.zeros(w.shape[0], np.int8), "wz"),
            nh.from_array(np.float32(0.05), "ys"), nh.from_array(np.uint8(0), "yz"),
        ]
        int_node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], **attrs)
        flt_node = helper.make_node("Conv", ["x", "wf"], ["y"], **attrs)
        out_type = TP.UINT8
    else:
        inits = [nh.from_array(w.T.copy(), "w"), nh.from_array(np.uint8(0), "xz")]
        f32 = [nh.from_array(w.T.astype(np.float32).copy(), "wf")]
        int_node = helper.make_node("MatMulInteger", ["x", "w", "xz"], ["y"])
        flt_node = helper.make_node("MatMul", ["x", "wf"], ["y"])
        out_type = TP.INT32
    opset = [helper.make_opsetid("", 17)]
    int_graph = helper.make_graph([int_node], "layer", [helper.make_tensor_value_info("x", TP.UINT8, in_shape)],
                                  [helper.make_tensor_value_info("y", out_type, None)], inits)
    flt_graph = helper.make_graph([flt_node], "layer", [helper.make_tensor_value_info("x", TP.FLOAT, in_shape)],
                                  [helper.make_tensor_value_info("y", TP.FLOAT, None)], f32)
    return helper.make_model(int_graph, opset_imports=opset), helper.make_model(flt_graph, opset_imports=opset)


def measure_latency_table(
    model: IntegerModel,
    *,
    batch_size: int = 1,
    repeats: int = 50,
    threads: int | None = None,
    layer_names: dict[str, str] | None = None,
) -> LatencyTable:
    """Median ONNX Runtime seconds per layer and weight width (2–8 share the int8 time; 32 is float).

    ``layer_names`` maps the program's value names to layer names when they differ
    (the fx node name ``layer1_0_conv1`` vs the module path ``layer1.0.conv1``); by
    default the module paths recorded in the model's ``meta['layer_bits']`` are matched
    by replacing dots with underscores.
    """
    if batch_size < 1 or repeats < 1:
        raise ConfigError("batch_size and repeats must be >= 1")
    env = model.run(torch.zeros(batch_size, *model.input_shape), keep=True)
    known = {name.replace(".", "_"): name for name in model.meta.get("layer_bits", {})}
    names = layer_names or known
    rows = {}
    for op in model.layers():
        in_shape = list(env[op.inputs[0]].shape)
        int_model, flt_model = _layer_models(op, in_shape)
        rng = np.random.default_rng(0)
        x_u8 = rng.integers(0, 256, in_shape, dtype=np.uint8)
        t_int = _median_seconds(_session(int_model, threads), {"x": x_u8}, repeats)
        t_flt = _median_seconds(_session(flt_model, threads), {"x": x_u8.astype(np.float32)}, repeats)
        row = {b: t_int for b in range(2, 9)}
        row[32] = t_flt
        rows[names.get(op.output, op.output)] = row
    meta = {"runtime": "onnxruntime", "batch_size": batch_size, "repeats": repeats, "statistic": "median seconds",
            "note": "weight widths 2-8 run on the same int8 kernels; 32 is float32"}
    return LatencyTable(rows, meta)


def measure_onnx_latency(
    path: str | os.PathLike, input_shape: tuple[int, ...], *, batch_size: int = 1, repeats: int = 50, threads: int | None = None
) -> float:
    """Median ONNX Runtime seconds of a whole exported model at ``batch_size`` (float32 input named as in the file)."""
    import onnx

    if batch_size < 1 or repeats < 1:
        raise ConfigError("batch_size and repeats must be >= 1")
    proto = onnx.load(str(path))
    name = proto.graph.input[0].name
    x = np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)
    return _median_seconds(_session(proto, threads), {name: x}, repeats)
