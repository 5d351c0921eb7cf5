"""A tiny random-init Hugging Face BERT and padded token batches, for the transformer tests."""

from __future__ import annotations

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


def token_batch(seed: int, batch: int = 8, length: int = 12, labels: int = 3, vocab: int = 100) -> dict[str, torch.Tensor]:
    """Token ids with right padding (pad id 0) of varied lengths, their attention mask and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.randint(0, labels, (batch,), generator=g)}


def tiny_text_data() -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """(train, eval) padded token batches for the command-line tests (``--data tests._bert:tiny_text_data``)."""
    return [token_batch(s) for s in range(4)], [token_batch(100 + s) for s in range(2)]
