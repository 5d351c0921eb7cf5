"""Every captured BERT-family classifier in integers: eval mode, ``to_integer``, its saved file and the exact ONNX
export equal bit for bit on right- and left-padded batches, and the fast export agrees."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import hessq
from tests._bert import FAMILIES, classifier_input_bound, tiny_encoder, token_batch


@pytest.mark.parametrize("family", FAMILIES[1:])  # BERT's own: tests/ops/test_bert.py
def test_family_runs_in_integers_bit_for_bit_with_its_fake_quant_and_onnx(family, tmp_path):
    model = tiny_encoder(family, dropout=0.0)
    pad = int(model.config.pad_token_id)
    calibration = [token_batch(s, pad=pad, left=bool(s % 2)) for s in range(4)]
    # mixed widths: the second layer (ALBERT's second group of shared layers) at 4 bits
    plan = {name: (4 if "layer.1." in name or "groups.1." in name else 8) for name in hessq.quantizable_layers(model)}
    assert sorted(set(plan.values())) == [4, 8]
    q = hessq.quantize(model, plan, calibration, pin_first_last=None)
    imodel = hessq.to_integer(q)
    exact, fast = tmp_path / "exact.onnx", tmp_path / "fast.onnx"
    hessq.export_onnx(imodel, exact)
    hessq.export_onnx(imodel, fast, mode="fast")
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (exact, fast)]
    imodel.save(tmp_path / "model.hq")
    loaded = hessq.load_integer(tmp_path / "model.hq")
    bound = classifier_input_bound(imodel)
    for left in (False, True):
        ids = token_batch(10, pad=pad, left=left)["input_ids"]
        with torch.no_grad():
            reference = model(input_ids=ids, attention_mask=(ids != pad).long()).logits
            fake = q.float_forward(ids)
        y = imodel(ids)
        assert torch.equal(q(ids), y)  # eval mode runs the integer program
        assert torch.equal(loaded(ids), y)  # and the saved file loads back to it
        assert np.array_equal(sessions[0].run(None, {"input": ids.numpy()})[0], y.numpy())
        # the fast export differs from the integer model only by roundings before the classifier: at most the span
        # of its input grid times each row's weights (what the method guarantees on any CPU)
        fast_logits = sessions[1].run(None, {"input": ids.numpy()})[0]
        assert np.isfinite(fast_logits).all()
        assert (np.abs(fast_logits - y.numpy()) <= bound * (1 + 1e-5)).all()
        # and the quantized model's float forward is close to the float model: the class it picks is the float
        # model's wherever that model's lead exceeds twice the gap
        gap = float((fake - reference).abs().max())
        top2 = reference.topk(2, 1).values
        sure = (top2[:, 0] - top2[:, 1]) > 2 * gap
        assert sure.any() and torch.equal(fake.argmax(1)[sure], reference.argmax(1)[sure])


def test_shared_layers_train_in_qat_and_stay_bit_exact(tmp_path):
    # ALBERT runs each group of layers twice: one quantized twin per shared Linear, one input grid for both calls
    # (each call's input requantized onto it), ranges that track both calls without breaking either's backward
    model = tiny_encoder("albert", dropout=0.0)
    batches = [token_batch(s) for s in range(3)]
    q = hessq.quantize(model, 8, batches, pin_first_last=None)
    shared = "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query"
    assert sum(n.target == shared for n in q.graph.nodes if n.op == "call_module") == 2
    before = q.get_submodule(shared).weight.detach().clone()
    hessq.finetune(q, batches, teacher=model, epochs=1, lr=1e-3, optimizer="adamw", track_ranges=True)
    assert not torch.equal(q.get_submodule(shared).weight.detach(), before)  # both calls' gradients reached it
    imodel = hessq.to_integer(q)
    hessq.export_onnx(imodel, tmp_path / "exact.onnx")
    session = ort.InferenceSession(str(tmp_path / "exact.onnx"), providers=["CPUExecutionProvider"])
    ids = token_batch(10)["input_ids"]
    assert np.array_equal(session.run(None, {"input": ids.numpy()})[0], imodel(ids).numpy())
