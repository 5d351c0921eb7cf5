"""The fast ONNX export of transformer models: 8-bit Linear layers on MatMulIntegerToFloat, at most 4-bit ones on
MatMulNBits, a tiny BERT run by ONNX Runtime with no float64 and its embedding codes bit for bit, a 4-bit table on
GatherBlockQuantized, and the latency table timing the 4-bit kernels apart from the 8-bit ones.

What each check asserts is what the method guarantees, not a margin seen on one machine:
- MatMulIntegerToFloat sums the exact int32 products and scales once in float32: the integer model's output up to
  float32 rounding (the input codes are the same but at an exact float tie of the input quantization);
- MatMulNBits (``accuracy_level=4``) re-quantizes its float input to int8 per block of the weight's input columns,
  by at most half a block step ≤ half the input grid's step on an 8-bit signed grid: each output within
  ½·s_in·Σ_k |w_k|·s_w of the integer model's;
- the logits of the fast export read codes on the classifier's input grid, so they differ from the integer
  model's by at most that grid's span times the row's weights (a range bound, whatever the ops before did).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import hessq
from hessq.integer import _latency
from tests._bert import classifier_input_bound, tiny_bert, token_batch


def _run(path, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(outputs, {"input": x})


def _op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _one_linear(bits: int, seed: int = 0) -> tuple[hessq.IntegerModel, torch.Tensor]:
    """A one-Linear integer model and inputs within its input grid's range (below the range of a ±127 grid the fast
    export's uint8 codes saturate at −128, one step beyond the integer model's −127)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(300, 48)).eval()  # 300 inputs: three MatMulNBits blocks, the last one padded
    q = hessq.quantize(model, bits, [(torch.randn(16, 300),) for _ in range(3)], pin_first_last=None)
    imodel = hessq.to_integer(q)
    top = 127 * float(next(op for op in imodel.ops if op.kind == "quantize").scale)
    return imodel, (torch.randn(32, 300) * 1.5).clamp(-top, top)


def _linear_terms(imodel: hessq.IntegerModel) -> tuple[float, torch.Tensor]:
    """(input grid step, Σ_k |w_k|·s_w per output row) of the model's one Linear layer."""
    linear = next(op for op in imodel.ops if op.kind == "linear")
    s_in = float(next(op for op in imodel.ops if op.kind == "quantize").scale)
    w_scale = linear.scale.double().reshape(-1) / s_in
    return s_in, linear.tensors["weight"].double().abs().sum(1) * w_scale


def test_8bit_linear_runs_on_matmul_integer_to_float(tmp_path):
    imodel, x = _one_linear(8)
    hessq.export_onnx(imodel, tmp_path / "fast.onnx", mode="fast")
    assert "MatMulIntegerToFloat" in _op_types(tmp_path / "fast.onnx")
    got = _run(tmp_path / "fast.onnx", x.numpy())[0]
    ref = imodel(x).numpy()
    # the same int32 accumulator, scaled and biased in float32: a few float32 ulps of the largest term
    linear = next(op for op in imodel.ops if op.kind == "linear")
    largest = (linear.attrs["bound"] * linear.scale.double().max()).item()
    assert np.abs(got - ref).max() <= 1e-5 * largest


def test_4bit_linear_runs_on_matmul_nbits(tmp_path):
    imodel, x = _one_linear(4)
    hessq.export_onnx(imodel, tmp_path / "fast.onnx", mode="fast")
    proto = onnx.load(str(tmp_path / "fast.onnx"))
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft"
    assert attrs == {"K": 300, "N": 48, "bits": 4, "block_size": 128, "accuracy_level": 4}
    # weights packed two per byte: 48 rows × 3 blocks × 64 bytes
    packed = next(t for t in proto.graph.initializer if t.name == node.input[1])
    assert list(packed.dims) == [48, 3, 64] and packed.data_type == onnx.TensorProto.UINT8
    got = _run(tmp_path / "fast.onnx", x.numpy())[0]
    ref = imodel(x).numpy()
    s_in, row_l1 = _linear_terms(imodel)
    bound = 0.5 * s_in * row_l1.numpy() * (1 + 1e-4) + 1e-6
    assert (np.abs(got - ref) <= bound).all()


def test_4bit_linear_codes_pack_and_unpack():
    from hessq.ops.linear import nbits_weight

    codes = torch.randint(-7, 8, (5, 130), generator=torch.Generator().manual_seed(0))
    packed, attrs = nbits_weight(codes)
    assert packed.shape == (5, 2, 64) and attrs["K"] == 130 and attrs["N"] == 5
    nibbles = np.stack([packed & 0xF, packed >> 4], -1).reshape(5, -1).astype(np.int64) - 8
    assert np.array_equal(nibbles[:, :130], codes.numpy()) and (nibbles[:, 130:] == 0).all()


@pytest.fixture(scope="module")
def bert_integer():
    model = tiny_bert(dropout=0.0)
    q = hessq.quantize(model, 8, [token_batch(s) for s in range(3)], pin_first_last=None)
    return hessq.to_integer(q)


def test_tiny_bert_fast_export_runs_on_int8_kernels(bert_integer, tmp_path):
    imodel = bert_integer
    path = tmp_path / "fast.onnx"
    hessq.export_onnx(imodel, path, mode="fast")
    proto = onnx.load(str(path))
    types = [n.op_type for n in proto.graph.node]
    # every Linear layer and both attention products of each layer on the int8 kernel with static scales, the
    # query, key and value of each layer as one (test_sibling_linears_run_as_one_matmul)
    products = sum(op.kind in ("linear", "matmul") for op in imodel.ops)
    layers = sum(op.kind == "masked_softmax" for op in imodel.ops)
    assert types.count("MatMulIntegerToFloat") == products - 2 * layers and "MatMulInteger" not in types
    # nonlinear ops in ONNX Runtime's float kernels: no elementwise Gather, no float64 anywhere
    assert {"Softmax", "LayerNormalization", "Gelu"} <= set(types)
    assert types.count("Gather") == 1  # the word embedding table
    inferred = onnx.shape_inference.infer_shapes(proto)
    elem_types = {v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    assert onnx.TensorProto.DOUBLE not in elem_types
    assert all(t.data_type != onnx.TensorProto.DOUBLE for t in proto.graph.initializer)
    # the padding mask is an additive bias built on the (B, 1, 1, T) keep: no op but the Softmax itself passes over
    # the masked scores a second time
    made_by = {o: n for n in proto.graph.node for o in n.output}
    for softmax in (n for n in proto.graph.node if n.op_type == "Softmax" and n.input[0] in made_by):
        masked = made_by[softmax.input[0]]
        assert masked.op_type == "Add" and made_by[masked.input[1]].op_type == "Where"
    assert types.count("Where") == sum(op.kind == "masked_softmax" for op in imodel.ops)
    # and it drops the padding keys: their probabilities are below e^-30 of the row's largest (codes of 0)
    ids = token_batch(7)["input_ids"]
    probe = onnx.load(str(path))
    softmaxes = [n.output[0] for n in probe.graph.node if n.op_type == "Softmax"]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in softmaxes)
    onnx.save(probe, str(tmp_path / "softmax_probe.onnx"))
    pad = (ids == 0).numpy()[:, None, None, :]
    assert pad.any() and (~pad).any()
    for p in _run(tmp_path / "softmax_probe.onnx", ids.numpy(), softmaxes):
        assert p.shape[-1] == ids.shape[1]
        dropped = np.broadcast_to(pad, p.shape)
        assert (p[dropped] <= np.exp(-30.0) * np.broadcast_to(p.max(-1, keepdims=True), p.shape)[dropped]).all()
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)

    values = imodel.run(ids.float(), keep=True)
    y_int = values[imodel.output_name].numpy()
    # the embedding lookup is one uint8 Gather of precomputed output codes: bit for bit the integer model's
    emb = next(op for op in imodel.ops if op.kind == "embedding")
    gather = next(n for n in proto.graph.node if n.op_type == "Gather")
    proto.graph.output.append(onnx.helper.make_tensor_value_info(gather.output[0], onnx.TensorProto.UINT8, None))
    onnx.save(proto, str(tmp_path / "probe.onnx"))
    y_fast, rows = _run(tmp_path / "probe.onnx", ids.numpy(), ["output", gather.output[0]])
    assert np.array_equal(rows.astype(np.int64) - 128, values[emb.output].numpy())
    # the logits: the classifier reads codes on its own input grid, so they differ by at most that grid's span
    # times the row's weights
    bound = classifier_input_bound(imodel)
    assert y_fast.shape == y_int.shape and np.isfinite(y_fast).all()
    assert (np.abs(y_fast - y_int) <= bound * (1 + 1e-5)).all()


def test_sibling_linears_run_as_one_matmul(bert_integer, tmp_path):
    """Query, key and value read one LayerNorm's codes: the fast export stacks their weights into one
    MatMulIntegerToFloat and splits its output. Each output is the same int32 dot product, scaled and biased by the
    same column's numbers, so the Split gives what the three kernels gave, up to float32 rounding of that scaling."""
    imodel = bert_integer
    hessq.export_onnx(imodel, tmp_path / "fused.onnx", mode="fast")
    hessq.export_onnx(imodel, tmp_path / "three.onnx", mode="fast", fuse_siblings=False)
    fused, three = onnx.load(str(tmp_path / "fused.onnx")), onnx.load(str(tmp_path / "three.onnx"))
    hidden = imodel.ops[[op.kind for op in imodel.ops].index("linear")].tensors["weight"].shape[1]
    layers = sum(op.kind == "masked_softmax" for op in imodel.ops)
    splits = [n for n in fused.graph.node if n.op_type == "Split"]
    assert len(splits) == layers
    made_by = {o: n for n in fused.graph.node for o in n.output}
    weights = {t.name: t for t in fused.graph.initializer}
    for split in splits:
        wide = made_by[split.input[0]]
        assert wide.op_type == "MatMulIntegerToFloat" and list(weights[wide.input[1]].dims) == [hidden, 3 * hidden]
    mm = lambda proto: [n for n in proto.graph.node if n.op_type == "MatMulIntegerToFloat"]  # noqa: E731
    assert len(mm(fused)) == len(mm(three)) - 2 * layers
    # the Split's outputs carry the three kernels' names: probe them in both graphs
    outputs = [o for s in splits for o in s.output]
    assert set(outputs) <= {n.output[0] for n in mm(three)}
    for proto, name in ((fused, "fused_probe.onnx"), (three, "three_probe.onnx")):
        proto.graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs)
        onnx.save(proto, str(tmp_path / name))
    ids = token_batch(9)["input_ids"].numpy()
    got = _run(tmp_path / "fused_probe.onnx", ids, outputs)
    want = _run(tmp_path / "three_probe.onnx", ids, outputs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * np.abs(w).max())
    with pytest.raises(hessq.ConfigTypeError, match="fuse_siblings"):
        hessq.export_onnx(imodel, tmp_path / "bad.onnx", mode="fast", fuse_siblings="yes")


def test_exact_export_of_tiny_bert_is_unchanged(bert_integer, tmp_path):
    hessq.export_onnx(bert_integer, tmp_path / "exact.onnx")
    ids = token_batch(8)["input_ids"]
    assert np.array_equal(_run(tmp_path / "exact.onnx", ids.numpy())[0], bert_integer(ids.float()).numpy())


def test_latency_table_times_4bit_linear_on_matmul_nbits(bert_integer, monkeypatch):
    # a real run first: every one-node graph (MatMulNBits included) loads and runs in ONNX Runtime
    table = hessq.integer.measure_latency_table(bert_integer, repeats=1)
    for row in table.values():
        assert set(row) >= {2, 3, 4, 8, 32}
    # which graph each width was timed on: a stand-in timer reporting the graph's op type
    seconds = {"MatMulNBits": 1.0, "MatMulInteger": 2.0, "MatMul": 3.0, "Gather": 4.0, "GatherBlockQuantized": 5.0}
    spinning = []
    monkeypatch.setattr(_latency, "_session", lambda proto, threads, spin: spinning.append(spin) or proto)
    def stand_in(proto, feed, repeats):  # uint8 weights (8-bit layers: uint8 × uint8, which cannot saturate) add 0.5
        weights = next(t for t in proto.graph.initializer if t.name == "w")
        return seconds[proto.graph.node[0].op_type] + 0.5 * (weights.data_type == onnx.TensorProto.UINT8
                                                              and proto.graph.node[0].op_type == "MatMulInteger")
    monkeypatch.setattr(_latency, "_median_seconds", stand_in)
    table = hessq.integer.measure_latency_table(bert_integer, repeats=1)
    assert spinning and all(spinning)  # ONNX Runtime's default, unless told otherwise
    spinning.clear()
    quiet = hessq.integer.measure_latency_table(bert_integer, repeats=1, spinning=False)
    assert spinning and not any(spinning)
    assert dict(quiet) == dict(table) and table.meta["spinning"] is True and quiet.meta["spinning"] is False
    with pytest.raises(hessq.ConfigTypeError, match="spinning must be True or False"):
        hessq.integer.measure_latency_table(bert_integer, repeats=1, spinning="no")
    kinds = {op.output: op.kind for op in bert_integer.layers()}
    assert sorted(kinds.values()).count("linear") == 2 * 6 + 2  # q, k, v, out, up, down per layer; pooler, classifier
    # the position and token-type lookups are one constant of the input length: no time at any width, so a
    # latency-limited plan (which needs every layer's time) can take the table as it is
    folded = {"bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings"}
    assert set(table.meta["folded_into_constants"]) == folded
    assert set(table) == set(bert_integer.meta["layer_bits"]) and len(table) == len(kinds) + len(folded)
    for name in folded:
        assert all(v == 0.0 for v in table[name].values())
    for name, row in table.items():
        if name in folded:
            continue
        if kinds[name.replace(".", "_")] == "embedding":
            # a lookup: a Gather, of the packed table at <= 4 bits
            assert all(row[b] == 5.0 for b in (2, 3, 4)) and all(row[b] == 4.0 for b in (5, 6, 7, 8, 32))
            continue
        assert row[32] == 3.0 and all(row[b] == 2.0 for b in range(5, 8)) and row[8] == 2.5
        assert all(row[b] == 1.0 for b in (2, 3, 4))  # Linear at <= 4 bits: MatMulNBits, distinct from int8


def test_4bit_embedding_table_runs_on_gather_block_quantized(tmp_path):
    model = tiny_bert(dropout=0.0)
    plan = {n: 4 if n.endswith("word_embeddings") else 8 for n in hessq.quantizable_layers(model)}
    imodel = hessq.to_integer(hessq.quantize(model, plan, [token_batch(s) for s in range(3)], pin_first_last=None))
    path = tmp_path / "fast.onnx"
    hessq.export_onnx(imodel, path, mode="fast")
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    table = next(t for t in proto.graph.initializer if t.name == node.input[0])
    assert list(table.dims) == [100, 16]  # 100 rows of 32 codes, two per byte
    # the looked-up rows onto the output grid: the integer lookup's codes, but where s_r·q/S lies within float32
    # rounding of a half step (one code at most)
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == node.output[0])
    proto.graph.output.append(onnx.helper.make_tensor_value_info(q.output[0], onnx.TensorProto.UINT8, None))
    onnx.save(proto, str(tmp_path / "probe.onnx"))
    ids = token_batch(9)["input_ids"]
    codes = _run(tmp_path / "probe.onnx", ids.numpy(), [q.output[0]])[0].astype(np.int64) - 128
    emb = next(op for op in imodel.ops if op.kind == "embedding")
    assert emb.attrs["w_bits"] == 4
    assert np.abs(codes - imodel.run(ids.float(), keep=True)[emb.output].numpy()).max() <= 1


def test_4bit_linear_on_the_int8_kernel_when_narrow_kernels_are_off(tmp_path):
    imodel, x = _one_linear(4)
    hessq.export_onnx(imodel, tmp_path / "fast.onnx", mode="fast", narrow_kernels=False)
    types = _op_types(tmp_path / "fast.onnx")
    assert "MatMulNBits" not in types and "MatMulIntegerToFloat" in types
    # the integer model's own int32 accumulator (the 4-bit codes fit int8), scaled in float32: a few ulps
    linear = next(op for op in imodel.ops if op.kind == "linear")
    largest = (linear.attrs["bound"] * linear.scale.double().max()).item()
    assert np.abs(_run(tmp_path / "fast.onnx", x.numpy())[0] - imodel(x).numpy()).max() <= 1e-5 * largest


def test_narrow_kernels_follow_the_latency_table(tmp_path):
    model = tiny_bert(dropout=0.0)
    narrow = {"bert.embeddings.word_embeddings", "bert.encoder.layer.0.attention.self.query",
              "bert.encoder.layer.1.intermediate.dense"}
    plan = {n: 4 if n in narrow else 8 for n in hessq.quantizable_layers(model)}
    imodel = hessq.to_integer(hessq.quantize(model, plan, [token_batch(s) for s in range(3)], pin_first_last=None))
    names = {imodel.layer_name(op): op for op in imodel.layers()}
    assert narrow <= set(names)

    def count(**kw) -> tuple[int, int]:
        hessq.export_onnx(imodel, tmp_path / "fast.onnx", mode="fast", **kw)
        types = _op_types(tmp_path / "fast.onnx")
        return types.count("MatMulNBits"), types.count("GatherBlockQuantized")

    assert count() == (2, 1) and count(narrow_kernels=True) == (2, 1)
    assert count(narrow_kernels=False) == (0, 0)
    # the table says 4 bits pays for the query layer alone: the other 4-bit Linear and the table stay on int8
    table = {name: {4: 1e-5, 8: 2e-5} if name.endswith("query") else {4: 3e-5, 8: 2e-5} for name in names}
    assert count(narrow_kernels=hessq.plan.LatencyTable(table)) == (1, 0)
    table["bert.embeddings.word_embeddings"] = {4: 1e-6, 8: 2e-6}
    assert count(narrow_kernels=table) == (1, 1)  # a plain mapping is taken as a table too
    del table["bert.encoder.layer.1.intermediate.dense"]
    with pytest.raises(hessq.ConfigError, match="layer.1.intermediate.dense"):
        count(narrow_kernels=table)
    with pytest.raises(hessq.ConfigTypeError, match="narrow_kernels must be True, False or a latency table"):
        count(narrow_kernels=None)
    with pytest.raises(hessq.ConfigError, match="mode='fast'"):  # the exact export has no kernels to choose
        hessq.export_onnx(imodel, tmp_path / "exact.onnx", narrow_kernels=table)
    assert not (tmp_path / "exact.onnx").exists()


@pytest.mark.parametrize("out_range,needed", [(1.0, False), (2.0, True)])
def test_gelu_input_saturation_left_out_only_where_the_table_ends_hold(out_range, needed):
    # GELU on a ±127 grid of step 0.05: with the output grid ending at GELU's value at the input range's end, the
    # output saturates above the range and rounds to 0 far below it, so clipping the input changes nothing; on an
    # output grid twice as wide it would (larger inputs give larger codes)
    from hessq.ops import Op, family_for_kind

    s_in = 0.05
    s_out = out_range * float(torch.nn.functional.gelu(torch.tensor(127 * s_in, dtype=torch.float64))) / 127
    codes = torch.arange(-127, 128, dtype=torch.float64)
    table = torch.clamp(torch.round(torch.nn.functional.gelu(codes * s_in) / s_out), -127, 127).to(torch.int64)
    attrs = {"in_qmin": -127, "qmin": -127, "qmax": 127, "function": "gelu", "params": {"approximate": "none"}}
    lut = Op("lut", ["x"], "y", attrs, {"table": table}, torch.tensor(s_out, dtype=torch.float64))
    grid = Op("requantize", ["a"], "x", {"qmin": -127, "qmax": 127}, {}, torch.tensor(s_in, dtype=torch.float64))
    assert family_for_kind("lut").fast_saturates_input(lut, grid) is needed


def test_sibling_fusion_on_a_handmade_graph():
    """The pass on its own: two Linears reading the same codes, one with a scale per column and a bias, one with a
    single scale and no bias, fuse; a third reading other codes, and one whose bias is computed, stay apart."""
    from onnx import TensorProto, helper, numpy_helper

    from hessq.integer._onnx_siblings import fuse_sibling_matmuls

    rng = np.random.default_rng(0)
    consts = {
        "w1": rng.integers(-127, 128, (8, 5), dtype=np.int8), "w2": rng.integers(-127, 128, (8, 3), dtype=np.int8),
        "w3": rng.integers(-127, 128, (8, 4), dtype=np.int8), "w4": rng.integers(-127, 128, (8, 2), dtype=np.int8),
        "s1": rng.uniform(0.01, 0.1, 5).astype(np.float32), "s2": np.float32(0.05), "b1": rng.standard_normal(5).astype(np.float32),
        "b4": rng.standard_normal(2).astype(np.float32), "sa": np.float32(0.02), "za": np.uint8(128),
        "one": np.float32(1.0),
    }
    nodes = [
        helper.make_node("MatMulIntegerToFloat", ["a", "w1", "sa", "s1", "za", "", "b1"], ["y1"], domain="com.microsoft"),
        helper.make_node("MatMulIntegerToFloat", ["a", "w2", "sa", "s2", "za"], ["y2"], domain="com.microsoft"),
        helper.make_node("MatMulIntegerToFloat", ["c", "w3", "sa", "s2", "za"], ["y3"], domain="com.microsoft"),
        helper.make_node("Mul", ["b4", "one"], ["b_run"]),  # a bias computed at run time: not a constant
        helper.make_node("MatMulIntegerToFloat", ["a", "w4", "sa", "s2", "za", "", "b_run"], ["y4"],
                         domain="com.microsoft"),
    ]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    fused, fused_inits = fuse_sibling_matmuls(nodes, inits, helper, numpy_helper)
    assert [n.op_type for n in fused].count("MatMulIntegerToFloat") == 3 and [n.op_type for n in fused].count("Split") == 1
    split = next(n for n in fused if n.op_type == "Split")
    assert list(split.output) == ["y1", "y2"]

    def run(graph_nodes, graph_inits):
        graph = helper.make_graph(
            graph_nodes, "g", [helper.make_tensor_value_info(n, TensorProto.UINT8, [6, 8]) for n in ("a", "c")],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y1", "y2", "y3", "y4")], graph_inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"a": rng_codes, "c": rng_codes[::-1].copy()})

    rng_codes = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    for got, want in zip(run(fused, fused_inits), run(nodes, inits)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
