"""Per-layer Hessian traces of a 1-layer transformer against its exact Hessian blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hessq
from hessq.graph import capture
from tests._bert import tiny_bert, token_batch


def _exact_block_trace(model, batches, weight: torch.nn.Parameter) -> float:
    """Tr(H_ll) of the size-weighted mean cross-entropy, from one Hessian-vector product per coordinate."""
    captured = capture(model)
    total = sum(len(b["labels"]) for b in batches)
    loss = sum(F.cross_entropy(captured(b["input_ids"]), b["labels"], reduction="sum") for b in batches) / total
    (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
    flat = grad.reshape(-1)
    trace = 0.0
    for i in range(flat.numel()):
        (row,) = torch.autograd.grad(flat[i], weight, retain_graph=True)
        trace += float(row.reshape(-1)[i])
    return trace


def test_layer_traces_of_a_one_layer_bert_match_its_exact_hessian_blocks():
    # weights at BERT's scale would leave a near-flat loss at init; a wider init gives the blocks real curvature
    model = tiny_bert(layers=1, hidden=8, heads=2, init_std=0.5).double()
    batches = [token_batch(10, batch=6, length=10), token_batch(11, batch=6, length=10)]
    query = model.bert.encoder.layer[0].attention.self.query.weight
    exact_query = _exact_block_trace(model, batches, query)
    exact_classifier = _exact_block_trace(model, batches, model.classifier.weight)
    names = ["bert.encoder.layer.0.attention.self.query", "classifier"]
    auto = hessq.hessian_sensitivity(model, batches, layers=names, eigenvalues=False)
    # small blocks come exact (one product per coordinate); the classifier's logits are linear in its
    # weights, so its Gauss-Newton trace is the Hessian's
    for name, exact in zip(names, (exact_query, exact_classifier)):
        assert auto[name].trace_stderr == 0
        assert abs(auto[name].trace - exact) <= 1e-9 * abs(exact)
    assert abs(exact_query) > 1e-3 and abs(exact_classifier) > 1e-3



@pytest.mark.slow  # about 40 s on 2 cores
def test_row_group_traces_of_a_bert_word_table_match_its_exact_block_with_the_mask():
    # the rows the texts read, as one group, against the table's exact trace (the loss with the attention mask,
    # as Hugging Face batches give it); a group of rows no text reads has none
    model = tiny_bert(layers=1, hidden=8, heads=2, init_std=0.5).double()
    batches = [token_batch(10, batch=6, length=10), token_batch(11, batch=6, length=10)]
    table = model.bert.embeddings.word_embeddings
    read = torch.cat([b["input_ids"].reshape(-1) for b in batches]).unique()
    unread = torch.tensor([r for r in range(table.num_embeddings) if r not in set(read.tolist())])
    with pytest.warns(UserWarning, match="short of rtol"):  # 100 draws reach about 30%
        read_trace, unread_trace = hessq.hessian_row_traces(
            model, batches, {"bert.embeddings.word_embeddings": [read, unread]}, rtol=0.05,
            max_samples=100)["bert.embeddings.word_embeddings"]

    def exact(mask: bool) -> float:
        total = sum(len(b["labels"]) for b in batches)
        loss = sum(F.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"] if mask else None)
                                   .logits, b["labels"], reduction="sum") for b in batches) / total
        (grad,) = torch.autograd.grad(loss, table.weight, create_graph=True)
        # the diagonal over the rows read (the others' is zero), one product per weight
        return sum(float(torch.autograd.grad(grad[r, j], table.weight, retain_graph=True)[0][r, j])
                   for r in read.tolist() for j in range(grad.shape[1]))

    masked, unmasked = exact(True), exact(False)
    assert abs(read_trace.trace - masked) <= 5 * read_trace.stderr < abs(masked - unmasked)
    assert unread_trace.trace == 0.0 and unread_trace.stderr == 0.0
