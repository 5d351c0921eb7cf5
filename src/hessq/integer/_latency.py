"""Per-layer latency measured on ONNX Runtime, in the table format the bit planner reads.

Each weighted layer of an IntegerModel is exported alone, as its op family's latency probe says
(uint8 activations, int8 per-channel weights: QLinearConv for a conv, MatMulInteger for a linear,
as in the fast export), and timed at its real input shape. ONNX Runtime executes the weight widths from 2 to 7 bits
with its int8 kernels (narrower codes are stored packed but computed as int8), so those widths share one measured
time, except the widths a family runs on a kernel of their own (``narrow_latency_models``: 8-bit Linear and conv
weights run as uint8 × uint8, since their uint8 × int8 pair sums can saturate on AVX2 CPUs without VNNI; a Linear layer of at most
4-bit weights is MatMulNBits in the fast export, which only pays at very few token rows (on MiniLM's Linears
on an AVX512-VNNI CPU: 0.93× int8's time at one row, 2.4× at 64; bench/nbits_rows.py); a table of
at most 4-bit codes is GatherBlockQuantized), timed separately; ``32`` holds the float32 time of the same layer for reference.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from hessq._checks import check_bool
from hessq._errors import ConfigError
from hessq.integer._model import IntegerModel
from hessq.integer._onnx import require_onnx
from hessq.ops import family_for_kind
from hessq.plan import LatencyTable


def _session(proto, threads: int | None, spinning: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # ONNX Runtime's default is on; on a shared or virtual machine with few cores spinning workers can make the
    # same model's median swing between runs (bench/_common.ort_session gives the figures)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
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


def _one_node_model(spec: tuple, input_shape: list[int], input_dtype: str):
    """A one-node ONNX model from a family's latency spec (op type, inputs, attributes, initializers, output dtype,
    and optionally the input's dtype when it is not ``input_dtype``: ``"int64"`` token ids)."""
    onnx, TP, helper, nh = require_onnx()
    op_type, inputs, attrs, inits, out_dtype = spec[:5]
    input_dtype = spec[5] if len(spec) > 5 else input_dtype
    types = {"uint8": TP.UINT8, "int32": TP.INT32, "float32": TP.FLOAT, "int64": TP.INT64}
    graph = helper.make_graph(
        [helper.make_node(op_type, inputs, ["y"], **attrs)], "layer",
        [helper.make_tensor_value_info("x", types[input_dtype], input_shape)],
        [helper.make_tensor_value_info("y", types[out_dtype], None)],
        [nh.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def measure_latency_table(
    model: IntegerModel,
    *,
    batch_size: int = 1,
    repeats: int = 50,
    threads: int | None = None,
    layer_names: dict[str, str] | None = None,
    spinning: bool = True,
) -> LatencyTable:
    """Median ONNX Runtime seconds per layer and weight width (2–8 share the int8 time but for the widths a family
    runs on a kernel of its own, such as 4-bit Linear on MatMulNBits; 32 is float).

    ``layer_names`` maps the program's value names to layer names when they differ
    (the fx node name ``layer1_0_conv1`` vs the module path ``layer1.0.conv1``); by
    default the module paths recorded in the model's ``meta['layer_bits']`` are matched
    by replacing dots with underscores. ``spinning`` is ONNX Runtime's ``session.intra_op.allow_spinning`` (on by
    default, as in ONNX Runtime): turn it off on a shared or virtual machine with few cores, where spinning workers
    make timings swing, and deploy with the same setting.
    """
    if batch_size < 1 or repeats < 1:
        raise ConfigError("batch_size and repeats must be >= 1")
    check_bool(spinning, "spinning")
    env = model.run(torch.zeros(batch_size, *model.input_shape), keep=True)
    rows = {}
    for op in model.layers():
        in_shape = list(env[op.inputs[0]].shape)
        family = family_for_kind(op.kind)
        int_spec, flt_spec = family.latency_models(op, in_shape)
        rng = np.random.default_rng(0)
        x_u8 = rng.integers(0, 256, in_shape, dtype=np.uint8)
        x_f32 = {"x": x_u8.astype(np.float32)}

        def seconds(spec: tuple, dtype: str) -> float:
            dtype = spec[5] if len(spec) > 5 else dtype
            # token ids: row 0 throughout (a lookup's time does not depend on which rows it reads)
            feed = {"x": x_u8} if dtype == "uint8" else x_f32 if dtype == "float32" else {"x": np.zeros(in_shape, np.int64)}
            return _median_seconds(_session(_one_node_model(spec, in_shape, dtype), threads, spinning), feed, repeats)

        t_int = seconds(int_spec, "uint8")
        row = {b: t_int for b in range(2, 9)}
        narrow: dict[int, float] = {}  # one timing per distinct graph (2-, 3- and 4-bit share MatMulNBits)
        for bits, spec in family.narrow_latency_models(op, in_shape).items():
            if id(spec) not in narrow:
                narrow[id(spec)] = seconds(spec, "float32")
            row[bits] = narrow[id(spec)]
        row[32] = seconds(flt_spec, "float32")
        rows[layer_names.get(op.output, op.output) if layer_names else model.layer_name(op)] = row
    layer_bits = model.meta.get("layer_bits", {})
    folded = []
    if rows and set(rows) <= set(layer_bits):
        # a layer with no op left at run time (a BERT's position and token-type lookups: one constant of the
        # input length) costs nothing at any width
        folded = [name for name in layer_bits if name not in rows]
        rows.update({name: {b: 0.0 for b in (*range(2, 9), 32)} for name in folded})
    meta = {"runtime": "onnxruntime", "batch_size": batch_size, "repeats": repeats, "statistic": "median seconds",
            "spinning": spinning,
            "note": "weight widths 2-7 run on the same uint8 x int8 kernels but where a family runs them on its own "
                    "(Linear at <= 4 bits: MatMulNBits; Linear and conv at 8 bits: uint8 x uint8, which cannot "
                    "saturate); 32 is float32", "folded_into_constants": folded}
    return LatencyTable(rows, meta)


def measure_onnx_latency(
    path: str | os.PathLike,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    repeats: int = 50,
    threads: int | None = None,
    spinning: bool = True,
) -> float:
    """Median ONNX Runtime seconds of a whole exported model at ``batch_size``, its first input named as in the file:
    float32 noise, or for a text model's int64 token ids, ids of 1 (every token real: no padding to skip).
    ``spinning``: as in :func:`measure_latency_table`."""
    import onnx

    if batch_size < 1 or repeats < 1:
        raise ConfigError("batch_size and repeats must be >= 1")
    check_bool(spinning, "spinning")
    proto = onnx.load(str(path))
    first = proto.graph.input[0]
    shape = (batch_size, *input_shape)
    if first.type.tensor_type.elem_type == onnx.TensorProto.INT64:
        x = np.ones(shape, np.int64)
    else:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return _median_seconds(_session(proto, threads, spinning), {first.name: x}, repeats)
