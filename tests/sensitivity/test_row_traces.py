"""hessian_row_traces: the Hessian trace of groups of an embedding table's rows, against the exact Hessian."""

import pytest
import torch

import hessq
from hessq.plan import lookup_counts, tiers_of


class _Words(torch.nn.Module):
    """A table read at two positions, a tanh, and a head: a Hessian with cross terms between rows."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = torch.nn.Embedding(12, dim, padding_idx=0)
        self.head = torch.nn.Linear(dim, 3)

    def forward(self, ids):
        h = self.words(ids)
        return self.head(torch.tanh(h[:, 0] * h[:, 1] + h[:, 2]))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 12, (16, 4), generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]


def _exact_diagonal(model) -> torch.Tensor:
    """The diagonal of the table's Hessian block of the mean loss over all batches, per weight [rows, dim]."""
    x = torch.cat([b[0] for b in _batches()])
    y = torch.cat([b[1] for b in _batches()])
    w = model.words.weight.detach()

    def loss(weight):
        h = torch.nn.functional.embedding(x, weight, padding_idx=0)
        return torch.nn.functional.cross_entropy(model.head(torch.tanh(h[:, 0] * h[:, 1] + h[:, 2])), y)

    hess = torch.autograd.functional.hessian(loss, w.double().clone())
    return hess.reshape(w.numel(), w.numel()).diagonal().reshape(w.shape)


def test_one_weight_per_group_is_the_exact_diagonal():
    # with one weight per row and one row per group, vᵀHv = H_ii on every draw: exact, standard error 0
    model = _Words(1).double()
    groups = [torch.tensor([r]) for r in range(1, 12)]
    traces = hessq.hessian_row_traces(model, [(x, y) for x, y in _batches()], {"words": groups}, max_samples=5)
    diagonal = _exact_diagonal(model)
    for t, rows in zip(traces["words"], groups):
        assert torch.equal(t.rows, rows) and t.stderr == pytest.approx(0, abs=1e-12)
        assert t.trace == pytest.approx(float(diagonal[rows].sum()), rel=1e-9, abs=1e-15)


def test_tier_traces_reach_their_precision_and_agree_with_the_exact_blocks():
    model = _Words(4).double()
    counts = lookup_counts(model, _batches())["words"]
    tiers = tiers_of(counts, 3)
    traces = hessq.hessian_row_traces(model, _batches(), {"words": tiers}, rtol=0.1, max_samples=2000)
    diagonal = _exact_diagonal(model)
    assert [t.rows.tolist() for t in traces["words"]] == [t.tolist() for t in tiers]
    for t in traces["words"]:
        exact = float(diagonal[t.rows].sum())
        assert t.stderr <= 0.1 * abs(t.trace)  # converged
        assert abs(t.trace - exact) <= 5 * t.stderr  # unbiased: within five standard errors
    # the padding row is never read: its block is zero, whichever group holds it
    zero = hessq.hessian_row_traces(model, _batches(), {"words": [torch.tensor([0])]}, max_samples=3)
    assert zero["words"][0].trace == 0.0


def test_short_of_precision_warns_and_bad_groups_are_refused():
    model = _Words(4).double()
    with pytest.warns(UserWarning, match="short of rtol"):
        hessq.hessian_row_traces(model, _batches(), {"words": [torch.arange(1, 12)]}, rtol=1e-6, max_samples=3)
    for groups, match in (({"head": [torch.tensor([0])]}, "not an nn.Embedding"),
                          ({"words": [torch.tensor([3]), torch.tensor([3, 4])]}, "more than one group"),
                          ({"words": [torch.tensor([12])]}, "outside 0..11"),
                          ({"words": []}, "at least one group"),
                          ({}, "must map")):
        with pytest.raises(hessq.HessqError, match=match):
            hessq.hessian_row_traces(model, _batches(), groups)
