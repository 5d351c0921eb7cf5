"""A tiny Hugging Face BERT end to end: W8A8 fake quantization close to the float model, gradients for every weight
in training mode, and the integer program (eval mode, ``to_integer``, exact ONNX) equal bit for bit on padded
batches."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import hessq
from hessq._compat import import_transformers
from tests._bert import classifier_input_bound

VOCAB = 100


def _bert(hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64):
    tr = import_transformers()
    torch.manual_seed(0)
    cfg = tr.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=64, num_labels=3,
                        attn_implementation="eager")
    return tr.BertForSequenceClassification(cfg).eval()


def _batch(seed: int, n: int = 8, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    ids[0, 8:] = 0
    ids[2, 5:] = 0
    ids[n - 1, 2:] = 0
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.randint(0, 3, (n,), generator=g)}


@pytest.fixture(scope="module")
def bert_w8a8():
    model = _bert()
    return model, hessq.quantize(model, 8, [_batch(i) for i in range(3)], pin_first_last=None)


def test_every_weight_is_quantized(bert_w8a8):
    model, q = bert_w8a8
    layers = hessq.quantizable_layers(model)
    assert sum(isinstance(m, torch.nn.Embedding) for m in layers.values()) == 3
    assert len(layers) == 3 + 2 * 6 + 2  # tables; q, k, v, out, up, down per layer; pooler, classifier
    assert set(q.layer_bits) == set(layers) and q.integer_eval and not q.float_ops
    kinds = {type(m).__name__ for m in q.modules()}
    assert {"QuantEmbedding", "QuantMatmul", "QuantSoftmax", "QuantLayerNorm", "QuantElementwise"} <= kinds


def test_w8a8_is_close_to_float_and_integer_is_exact(bert_w8a8, tmp_path):
    model, q = bert_w8a8
    ids = _batch(7)["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        fake = q.float_forward(ids)
    spread = float(reference.max() - reference.min())
    error = float((fake - reference).abs().max())
    assert error <= 0.1 * spread  # 8-bit grids everywhere: a small fraction of the logits' range
    # where the float model's top logit leads by more than twice the error, the class cannot change
    top2 = reference.topk(2, 1).values
    sure = (top2[:, 0] - top2[:, 1]) > 2 * error
    assert torch.equal(fake.argmax(1)[sure], reference.argmax(1)[sure])
    # eval mode runs the integer program: the integer model's result, bit for bit
    imodel = hessq.to_integer(q)
    y = imodel(ids)
    assert torch.equal(q(ids), y)
    assert (y - fake).abs().max() <= 0.02 * spread  # the same arithmetic but for the dyadic roundings
    assert {"embedding", "constant", "compare", "matmul", "masked_softmax", "layer_norm", "lut"} <= {op.kind for op in imodel.ops}
    hessq.export_onnx(imodel, tmp_path / "bert.onnx")
    session = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"input": ids.numpy()})[0], y.numpy())


def test_residual_stream_is_16_bit_and_every_matmul_reads_8_bit_codes(bert_w8a8):
    # I-BERT's layout: the adds feeding each LayerNorm and its input on 16-bit grids, every matmul's inputs 8-bit
    _, q = bert_w8a8
    quantizers = hessq.graph.act_quantizers(q)
    wide = {n for n, a in quantizers.items() if a.bits == 16}
    assert {n for n in quantizers if n.endswith(".input_quantizer") and "layer_norm" in n} <= wide
    assert len([n for n in wide if n.startswith("quant_add_")]) == 2 + 2 * 2  # embedding sums, two per layer
    imodel = hessq.to_integer(q)
    checked = 0
    for op in imodel.ops:
        if op.kind in ("linear", "matmul"):
            for name in op.inputs:
                producer = next(p for p in imodel.ops if p.output == name)
                if "qmax" in producer.attrs:  # a grid (a reshape or permute in between keeps its producer's)
                    assert producer.attrs["qmax"] - producer.attrs["qmin"] <= 255, (op.output, name)
                    checked += 1
    assert checked >= 2 * 6  # at least each layer's Q, K, V, out, up and down projections
    with pytest.raises(hessq.ConfigError, match="act_range"):
        hessq.quantize(_bert(), 8, [_batch(0)], act_range="clip")
    narrow = hessq.quantize(_bert(), 8, [_batch(i) for i in range(3)], pin_first_last=None, residual_bits=8)
    assert {a.bits for a in hessq.graph.act_quantizers(narrow).values()} == {8}


def test_training_mode_has_gradients_for_every_weight(bert_w8a8):
    _, q = bert_w8a8
    q.train()
    try:
        batch = _batch(11)
        loss = torch.nn.functional.cross_entropy(q(batch["input_ids"]), batch["labels"])
        loss.backward()
        # the quantized twins and the quantized LayerNorms hold every weight the forward uses
        used = [(f"{n}.{k}", p) for n, m in q.named_modules() if isinstance(m, (hessq.ops.QuantLayer, hessq.ops.QuantLayerNorm))
                for k, p in m.named_parameters(recurse=False)]
        assert len(used) == 2 * 17 - 3 + 2 * (2 * 2 + 1)  # weights and biases (tables have none), LayerNorms' γ, β
        for name, p in used:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    finally:
        q.zero_grad(set_to_none=True)
        q.eval()


def test_minilm_width_layer_norm_runs_in_integers():
    # all-MiniLM-L6-v2 is 384 wide: its integer LayerNorm (Newton square root) stays within its 2^52 bound
    model = _bert(hidden=384, layers=1, heads=6, intermediate=32)
    q = hessq.quantize(model, 8, [_batch(0, n=3, length=6)], pin_first_last=None)
    ids = _batch(1, n=3, length=6)["input_ids"]
    imodel = hessq.to_integer(q)
    assert [op.attrs["count"] for op in imodel.ops if op.kind == "layer_norm"] == [384] * 3
    assert torch.equal(q(ids), imodel(ids))


def test_integer_model_pads_shorter_inputs_to_its_length(bert_w8a8, tmp_path):
    # compiled for 16 tokens, it takes 12: padded keys are masked, so the real tokens' logits are those at 12
    _, q = bert_w8a8
    imodel = hessq.to_integer(q, input_shape=(16,))
    assert imodel.input_shape == (16,) and imodel.meta["pad_token_id"] == 0
    ids = _batch(5)["input_ids"]
    assert torch.equal(imodel(ids), q(ids))
    hessq.to_integer(q).save(tmp_path / "bert.hq")  # the padding token travels with the file
    assert hessq.load_integer(tmp_path / "bert.hq").meta["pad_token_id"] == 0
    with pytest.raises(hessq.InputDataError, match=r"at most 16 tokens.*input_shape=\(20,\)"):
        imodel(torch.zeros(2, 20, dtype=torch.long))  # longer than compiled: refused, never cut
    for bad in ((0,), "16", (16.5,)):
        with pytest.raises(hessq.ConfigError, match="input_shape"):
            hessq.to_integer(q, input_shape=bad)


def test_a_linear_reading_16_bit_codes_exports_exactly(tmp_path):
    # A plan may give a Linear 16-bit inputs (the feed-forward's output Linear reading the GELU's wide range). No
    # ONNX integer kernel takes 16-bit codes: the exact export runs MatMulInteger on their byte planes, bit for bit.
    model = _bert()
    plan = {name: (8, 16) if name.endswith("output.dense") and "attention" not in name else (8, 8)
            for name in hessq.quantizable_layers(model)}
    q = hessq.quantize(model, plan, [_batch(i) for i in range(3)], pin_first_last=None)
    imodel = hessq.to_integer(q)
    wide = [op for op in imodel.ops if op.kind == "linear" and any(
        o.output == op.inputs[0] and o.attrs.get("qmax", 0) > 255 for o in imodel.ops)]
    assert len(wide) == 2  # one per layer
    ids = _batch(8)["input_ids"]
    y = imodel(ids)
    for mode in ("exact", "fast"):
        hessq.export_onnx(imodel, tmp_path / f"{mode}.onnx", mode=mode)
    exact, fast = (ort.InferenceSession(str(tmp_path / f"{m}.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": ids.numpy()})[0] for m in ("exact", "fast"))
    assert np.array_equal(exact, y.numpy())
    # the fast export rounds differently before the classifier: at most its input grid's span times its weights
    assert (np.abs(fast - y.numpy()) <= classifier_input_bound(imodel) * (1 + 1e-5)).all()
