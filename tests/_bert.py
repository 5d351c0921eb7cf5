"""A tiny random-init Hugging Face BERT and padded token batches, for the transformer tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hessq._compat import import_transformers


def tiny_bert(layers: int = 2, hidden: int = 32, heads: int = 4, labels: int = 3, seed: int = 0,
              init_std: float = 0.02, dropout: float = 0.1) -> nn.Module:
    """``transformers.BertForSequenceClassification`` with a small config, eager attention, in eval mode."""
    tr = import_transformers()
    torch.manual_seed(seed)
    config = tr.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=labels,
                           attn_implementation="eager", initializer_range=init_std,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return tr.BertForSequenceClassification(config).eval()


#: The BERT-family classifiers hessq captures (tiny_encoder builds each).
FAMILIES = ("bert", "electra", "distilbert", "roberta", "xlm-roberta", "camembert", "albert", "mpnet")


def tiny_encoder(family: str, layers: int = 2, hidden: int = 32, heads: int = 4, labels: int = 3, seed: int = 0,
                 dropout: float = 0.1) -> nn.Module:
    """A random-init sequence classifier of ``family`` (one of :data:`FAMILIES`), eager attention, in eval mode.

    ELECTRA gets embeddings narrower than its hidden width (its ``embeddings_project``); RoBERTa, XLM-R and CamemBERT pad
    with id 1, as theirs do. ALBERT gets narrower embeddings too, and ``layers`` groups of shared layers, each run
    twice (``num_hidden_layers`` = 2 × ``layers``). MPNet pads with id 1 and adds its relative-position attention
    bias to every layer's scores."""
    if family == "bert":
        return tiny_bert(layers, hidden, heads, labels, seed, dropout=dropout)
    tr = import_transformers()
    torch.manual_seed(seed)
    if family == "distilbert":
        config = tr.DistilBertConfig(vocab_size=100, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=2 * hidden,
                                     max_position_embeddings=64, num_labels=labels, attn_implementation="eager",
                                     dropout=dropout, attention_dropout=dropout)
        return tr.DistilBertForSequenceClassification(config).eval()
    common = dict(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=labels,
                  attn_implementation="eager", hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if family == "electra":
        return tr.ElectraForSequenceClassification(tr.ElectraConfig(embedding_size=hidden // 2, **common)).eval()
    if family == "roberta":
        return tr.RobertaForSequenceClassification(tr.RobertaConfig(pad_token_id=1, **common)).eval()
    if family == "xlm-roberta":
        return tr.XLMRobertaForSequenceClassification(tr.XLMRobertaConfig(pad_token_id=1, **common)).eval()
    if family == "albert":
        config = tr.AlbertConfig(embedding_size=hidden // 2, num_hidden_groups=layers,
                                 **{**common, "num_hidden_layers": 2 * layers})
        return tr.AlbertForSequenceClassification(config).eval()
    if family == "mpnet":
        return tr.MPNetForSequenceClassification(tr.MPNetConfig(pad_token_id=1, **common)).eval()
    if family == "camembert":
        return tr.CamembertForSequenceClassification(tr.CamembertConfig(pad_token_id=1, **common)).eval()
    raise ValueError(f"unknown family {family!r}")


def token_batch(seed: int, batch: int = 8, length: int = 12, labels: int = 3, vocab: int = 100, pad: int = 0,
                left: bool = False) -> dict[str, torch.Tensor]:
    """Token ids with right padding (``left``: left padding) by ``pad`` of varied lengths, their attention mask and
    labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    ids[ids == pad] = pad + 1  # only padding is the pad id
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    position = torch.arange(length)[None, :]
    ids[(position < length - lengths[:, None]) if left else (position >= lengths[:, None])] = pad
    return {"input_ids": ids, "attention_mask": (ids != pad).long(), "labels": torch.randint(0, labels, (batch,), generator=g)}


def tiny_text_data() -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """(train, eval) padded token batches for the command-line tests (``--data tests._bert:tiny_text_data``)."""
    return [token_batch(s) for s in range(4)], [token_batch(100 + s) for s in range(2)]


def tiny_text_data_padded_with_1() -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """:func:`tiny_text_data` padded with id 1, as RoBERTa's and MPNet's tokenizers pad."""
    return [token_batch(s, pad=1) for s in range(4)], [token_batch(100 + s, pad=1) for s in range(2)]


def classifier_input_bound(imodel) -> np.ndarray:
    """How far two logits can lie apart when they differ only in the codes the last Linear reads: every code on its
    input grid, so at most the grid's span times each output row's |weights| (one value per class)."""
    classifier = [op for op in imodel.ops if op.kind == "linear"][-1]
    grid = next(op for op in imodel.ops if op.output == classifier.inputs[0])
    span = 2 * grid.attrs["qmax"] * classifier.scale.double().reshape(-1)
    return (classifier.tensors["weight"].double().abs().sum(1) * span).numpy()
