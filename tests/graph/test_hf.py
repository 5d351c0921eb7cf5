"""Capture of a Hugging Face BERT: the same logits, the user's layer names, dict batches checked."""

from __future__ import annotations

import pytest
import torch

import hessq
from hessq._checks import split_batch
from hessq._errors import InputDataError, ModelError
from hessq.graph import capture, quantizable_layers, traced
from tests._bert import tiny_bert, tiny_encoder, token_batch


def test_captured_bert_gives_the_original_logits_on_padded_batches():
    model = tiny_bert()
    batch = token_batch(0)
    assert (batch["attention_mask"] == 0).any()  # padding present: the derived mask is exercised
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        graph = traced(model)
        assert torch.allclose(capture(model)(batch["input_ids"]), reference, atol=1e-5)
        assert torch.allclose(graph(batch["input_ids"]), reference, atol=1e-5)


def test_captured_layers_keep_the_module_paths_of_the_hugging_face_model():
    model = tiny_bert(layers=2)
    names = list(quantizable_layers(model))
    assert "bert.encoder.layer.0.attention.self.query" in names
    assert "bert.encoder.layer.1.output.dense" in names
    assert "classifier" in names
    original = dict(model.named_modules())
    assert all(name in original for name in names)
    # the capture shares the user's modules rather than copying them
    assert capture(model).bert.encoder.layer[0].attention.self.query is original["bert.encoder.layer.0.attention.self.query"]


def test_training_mode_dropout_and_gradients_flow_through_the_capture():
    model = tiny_bert()
    captured = capture(model).train()
    loss = torch.nn.functional.cross_entropy(captured(token_batch(1)["input_ids"]), token_batch(1)["labels"])
    loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_dict_batches_split_into_token_ids_and_labels():
    batch = token_batch(2)
    inputs, targets = split_batch(batch)
    assert inputs is batch["input_ids"] and targets is batch["labels"]
    bad = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))  # masks nothing, yet there is padding
    bad["attention_mask"][0, -1] = 0
    bad["input_ids"][0, -1] = 7
    with pytest.raises(InputDataError, match="not the padding"):
        split_batch(bad)
    with pytest.raises(InputDataError, match="token_type_ids"):
        split_batch(dict(batch, token_type_ids=torch.ones_like(batch["input_ids"])))
    with pytest.raises(InputDataError, match="labels"):
        split_batch({"input_ids": batch["input_ids"]})


def test_a_batch_padded_with_another_id_than_the_models_is_refused_by_every_stage():
    # RoBERTa pads with 1. A batch padded (and masked) with 0, BERT's pad, is consistent in itself, yet the captured
    # model finds its padding by its own id and would read those zeros as text.
    model = tiny_encoder("roberta")
    wrong = token_batch(5, pad=0)
    wrong["input_ids"][wrong["input_ids"] == 1] = 2  # no real token is the model's pad either
    with torch.no_grad():
        model.classifier.out_proj.weight.mul_(100)  # logits of order 1, not 0.01 (random init)
        reference = model(input_ids=wrong["input_ids"], attention_mask=wrong["attention_mask"]).logits
        assert (capture(model)(wrong["input_ids"]) - reference).abs().max() > 1e-3  # what the check guards against
    q = hessq.quantize(model, 8, [token_batch(6, pad=1)], pin_first_last=None)
    stages = {
        "quantize": lambda: hessq.quantize(model, 8, [wrong], pin_first_last=None),
        "accuracy": lambda: hessq.accuracy(model, [wrong]),
        "accuracy of the quantized model": lambda: hessq.accuracy(q, [wrong]),
        "hessian_sensitivity": lambda: hessq.hessian_sensitivity(model, [wrong], method="restricted", max_samples=2,
                                                                 min_samples=2, eigenvalues=False),
        "finetune": lambda: hessq.finetune(q, [wrong], epochs=1, progress=False, checkpoint=None),
        "split_batch": lambda: split_batch(wrong, model=q),
    }
    for stage, call in stages.items():
        with pytest.raises(InputDataError, match="pads with id 0 but the model's pad_token_id is 1"):
            call()
    # padded with the model's id, the same texts pass, and give the original logits
    right = dict(wrong, input_ids=wrong["input_ids"].masked_fill(wrong["attention_mask"] == 0, 1))
    assert split_batch(right, model=model)[0] is right["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(capture(model)(right["input_ids"]), reference, rtol=0, atol=1e-5)


def test_unsupported_hugging_face_model_is_refused_by_name():
    tr = pytest.importorskip("transformers")
    config = tr.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(ModelError, match="BertForMaskedLM"):
        capture(tr.BertForMaskedLM(config))


def test_hessian_sensitivity_takes_the_hugging_face_model_and_dict_batches():
    model = tiny_bert(layers=1)
    sens = hessq.hessian_sensitivity(model, [token_batch(3), token_batch(4)], method="restricted", max_samples=4,
                                     min_samples=4, eigenvalues=False)
    assert list(sens) == list(quantizable_layers(model))
    assert all(sens[n].extra["samples"] == 4 and torch.isfinite(torch.tensor(sens[n].trace)) for n in sens)


@pytest.mark.parametrize("training", [False, True])
def test_a_pass_over_the_captured_model_leaves_the_users_modes_as_they_were(training):
    # The wrapper is a new module: had it kept nn.Module's default (training), a pass that restores the mode it
    # found (eval for the Hessian, then back) would switch the eval-mode model's dropout on.
    model = tiny_bert(layers=1, hidden=8, heads=2).train(training)
    assert capture(model).training is training
    batch = token_batch(0, batch=4, length=8)
    hessq.hessian_sensitivity(model, [batch], layers=["classifier"], eigenvalues=False, max_samples=2)
    assert {m.training for m in model.modules()} == {training}
    if not training:  # dropout off: the same logits twice
        ids = batch["input_ids"]
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
