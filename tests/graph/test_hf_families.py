"""Capture of every BERT-family classifier hessq supports: the original logits on right- and left-padded batches,
the user's module paths, and RoBERTa's positions numbered from the padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hessq._compat import import_transformers
from hessq._errors import ConfigError, ConfigTypeError, ModelError
from hessq.graph import capture, encoder_layout, quantizable_layers, register_encoder, traced
from hessq.ops.mask import padding_positions, relative_position_buckets
from tests._bert import FAMILIES, tiny_encoder, token_batch


def _pad(model) -> int:
    return int(model.config.pad_token_id)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("left", [False, True])
def test_captured_family_gives_the_original_logits_on_padded_batches(family, left):
    model = tiny_encoder(family)
    batch = token_batch(0, pad=_pad(model), left=left)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(capture(model)(batch["input_ids"]), reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(traced(model)(batch["input_ids"]), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_family_keeps_the_users_module_paths_and_trains(family):
    model = tiny_encoder(family)
    names = list(quantizable_layers(model))
    original = dict(model.named_modules())
    assert all(name in original for name in names)
    linears = sum(isinstance(original[n], torch.nn.Linear) for n in names)
    tables = sum(isinstance(original[n], torch.nn.Embedding) for n in names)
    # six per layer (ALBERT's: per group of shared layers), two in each family's head, and ELECTRA's and ALBERT's
    # embedding projection
    assert linears == 2 * 6 + 2 + (family in ("electra", "albert"))
    # words, positions, and token types (MPNet: its relative attention bias, a table of (bucket, head) biases)
    assert tables == (2 if family == "distilbert" else 3)
    # the capture holds the user's modules, not copies, and gradients reach them
    captured = capture(model).train()
    batch = token_batch(1, pad=_pad(model))
    torch.nn.functional.cross_entropy(captured(batch["input_ids"]), batch["labels"]).backward()
    first = next(p for n, p in model.named_parameters()
                 if ("layer.0." in n or "groups.0." in n) and n.endswith("weight") and p.dim() == 2)
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_padding_positions_are_robertas_on_both_paddings():
    import_transformers()  # (its torchvision guard first)
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    for left in (False, True):
        ids = token_batch(3, pad=1, left=left)["input_ids"]
        expected = RobertaEmbeddings.create_position_ids_from_input_ids(ids, 1)
        assert torch.equal(padding_positions(ids, 1), expected)


def test_relative_position_buckets_are_mpnets():
    import_transformers()
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    # past 16 tokens the buckets are log-spaced, past 128 they saturate: every branch, both directions
    for length in (1, 12, 40, 300):
        position = torch.arange(length)
        expected = MPNetEncoder.relative_position_bucket(position[None, :] - position[:, None])
        assert torch.equal(relative_position_buckets(length), expected.unsqueeze(0))


def test_mpnets_relative_attention_bias_reaches_its_logits():
    # the bias is in every layer's scores: captured without it, the logits move
    model = tiny_encoder("mpnet")
    batch = token_batch(2, pad=1, length=40)
    with torch.no_grad():
        model.mpnet.encoder.relative_attention_bias.weight.normal_()
        model.classifier.out_proj.weight.mul_(100)  # logits of order 1, not 0.01 (random init)
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(capture(model)(batch["input_ids"]), reference, rtol=0, atol=1e-5)
        model.mpnet.encoder.relative_attention_bias.weight.zero_()
        assert (capture(model)(batch["input_ids"]) - reference).abs().max() > 1e-3
    # MPNet numbers its positions from padding id 1 whatever its config says: another pad id is refused, not misread
    model.config.pad_token_id = 0
    with pytest.raises(ModelError, match="numbers positions from padding id 1"):
        capture(model)


def test_a_layout_of_your_own_captures_a_class_hessq_does_not_know(monkeypatch):
    # a BERT whose head skips the pooler: the classifier reads the first token's hidden state as it is
    import hessq.graph._hf as hf

    monkeypatch.setattr(hf, "_CAPTURES", dict(hf._CAPTURES))  # the registration stays in this test
    monkeypatch.setattr(hf, "_LAYOUTS", dict(hf._LAYOUTS))
    tr = import_transformers()

    class PoolerlessBert(tr.BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.classifier(h[:, 0])

    torch.manual_seed(0)
    model = PoolerlessBert(tiny_encoder("bert").config).eval()
    with pytest.raises(ModelError, match="cannot capture the Hugging Face PoolerlessBert"):
        capture(model)
    with pytest.raises(ModelError, match="no encoder layout for 'PoolerlessBert'"):
        encoder_layout("PoolerlessBert")
    layout = dataclasses.replace(encoder_layout("BertForSequenceClassification"), head=lambda m, h: m.classifier(h[:, 0]))
    register_encoder(layout, "PoolerlessBert")
    batch = token_batch(4)
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(capture(model)(batch["input_ids"]), reference, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="positions must be"):
        dataclasses.replace(layout, positions="learned")
    with pytest.raises(ConfigTypeError, match="head must be a function"):
        dataclasses.replace(layout, head="classifier")
    with pytest.raises(ConfigTypeError, match="EncoderLayout"):
        register_encoder("BertForSequenceClassification", "PoolerlessBert")
    with pytest.raises(ConfigTypeError, match="class names"):
        register_encoder(layout)


def test_a_layout_naming_a_part_the_model_lacks_is_refused_at_capture(monkeypatch):
    import hessq.graph._hf as hf

    monkeypatch.setattr(hf, "_CAPTURES", dict(hf._CAPTURES))
    monkeypatch.setattr(hf, "_LAYOUTS", dict(hf._LAYOUTS))
    model = tiny_encoder("distilbert")
    register_encoder(dataclasses.replace(encoder_layout("DistilBertForSequenceClassification"), ffn_in="ffn.up"),
                     "DistilBertForSequenceClassification")
    with pytest.raises(ModelError, match="does not have the parts"):
        capture(model)
    register_encoder(dataclasses.replace(encoder_layout("DistilBertForSequenceClassification"), base="encoder"),
                     "DistilBertForSequenceClassification")
    with pytest.raises(ModelError, match="does not have the parts"):
        capture(model)
