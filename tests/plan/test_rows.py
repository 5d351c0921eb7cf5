"""Row tiers of an embedding table: lookups counted, tiers by halves of the lookups, the ILP over tiers against a
brute force, and the folded plan (row_bits) through save, load and quantize."""

import itertools
import math

import pytest
import torch

import hessq
from hessq.ops.embedding import RowQuantizer
from hessq.plan import BitPlan, lookup_counts, plan_bits
from hessq.plan._cost import NEGATIVE_FLOOR
from hessq.plan._rows import tiers_of
from hessq.quantizer._functional import quantization_error
from tests._models import make_sensitivity


class _Table(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = torch.nn.Embedding(40, 16, padding_idx=0)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, ids):
        h = self.words(ids)
        return self.head(h[:, 0] + h[:, 1])


def _batches():
    g = torch.Generator().manual_seed(0)
    # Zipf-like ids: row r drawn with weight 1/r (row 0, the padding, as often as row 1)
    weights = 1 / torch.arange(1, 41).double()
    return [(torch.multinomial(weights, 8 * 6, replacement=True, generator=g).reshape(8, 6),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]


def test_lookup_counts_are_the_ids_without_padding():
    model = _Table()
    counts = lookup_counts(model, _batches())
    ids = torch.cat([x.flatten() for x, _ in _batches()])
    expected = torch.bincount(ids, minlength=40)
    expected[0] = 0
    assert list(counts) == ["words"] and torch.equal(counts["words"], expected)
    with pytest.raises(hessq.ConfigError, match="no nn.Embedding"):
        lookup_counts(torch.nn.Sequential(torch.nn.Linear(2, 2)), [torch.zeros(1, 2)])


def test_tiers_hold_halves_of_the_lookups():
    counts = torch.tensor([0, 1, 8, 4, 2, 1, 0, 16])
    tiers = tiers_of(counts, 4)  # 32 lookups: 16 | 8 | 4 | the rest
    assert [t.tolist() for t in tiers] == [[7], [2], [3], [4, 1, 5, 0, 6]]
    assert [t.tolist() for t in tiers_of(counts, 1)] == [[7, 2, 3, 4, 1, 5, 0, 6]]
    assert sorted(torch.cat(tiers_of(torch.randint(0, 50, (100,)), 5)).tolist()) == list(range(100))
    for bad in (0, 2.5, True):
        with pytest.raises(hessq.ConfigError, match="at least 1"):
            tiers_of(counts, bad)


def _omega(model, sens, counts, tiers, tier_bits, head_bits):
    """Σ Ω from the formula: each tier's share of the table's trace (by lookups) per weight, times its error."""
    w = model.words.weight.detach()
    trace = sens["words"].trace
    total = sum(trace * float(counts[rows].sum() / counts.sum()) / (len(rows) * w.shape[1])
                * RowQuantizer(b).squared_error(w[rows]) for rows, b in zip(tiers, tier_bits))
    return total + sens["head"].mean_trace * quantization_error(model.head.weight, head_bits)


def _size(tiers, tier_bits, head_bits):
    words = sum(math.ceil(len(rows) * 16 * b / 8) + 4 * len(rows) for rows, b in zip(tiers, tier_bits))
    return words + math.ceil(48 * head_bits / 8) + 3 * 4 + 3 * 4  # head: weights, int32 bias, scales


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_plan_over_row_tiers_equals_brute_force_and_folds_into_row_bits(tmp_path, fraction):
    model = _Table()
    sens = make_sensitivity(model, signature=False)
    counts = lookup_counts(model, _batches())["words"]
    tiers = tiers_of(counts, 3)
    bits = (2, 4, 8)
    lo, hi = _size(tiers, (2,) * len(tiers), 2), _size(tiers, (8,) * len(tiers), 8)
    limit = lo + fraction * (hi - lo)
    plan = plan_bits(model, sens, weight_bits=bits, size_limit=limit, pin_first_last=None,
                     row_usage={"words": counts}, row_tiers=3)
    best = min((_omega(model, sens, counts, tiers, choice[:-1], choice[-1]), choice)
               for choice in itertools.product(bits, repeat=len(tiers) + 1)
               if _size(tiers, choice[:-1], choice[-1]) <= limit)
    assert plan.omega == pytest.approx(best[0], rel=1e-6)
    # the plan's own tier widths (a near-tie of Ω may pick another optimum than the brute force's on another CPU)
    assert [t["rows"] for t in plan.layers["words"]["row_tiers"]] == [len(r) for r in tiers]
    widths = dict(enumerate(t["bits"] for t in plan.layers["words"]["row_tiers"]))
    chosen = [widths[k] for k in range(len(tiers))]
    assert _omega(model, sens, counts, tiers, chosen, plan["head"]) == pytest.approx(plan.omega, rel=1e-6)
    assert plan.size_bytes == _size(tiers, chosen, plan["head"]) <= limit
    # folded: the table at its largest tier's width, the other tiers' rows listed with theirs
    largest = max(range(len(tiers)), key=lambda k: len(tiers[k]))
    assert plan["words"] == widths[largest]
    expected = {}
    for k, rows in enumerate(tiers):
        if widths[k] != widths[largest]:
            expected.setdefault(widths[k], []).extend(rows.tolist())
    assert plan.row_bits == {"words": {b: sorted(r) for b, r in expected.items()}}
    per_row = torch.full((40,), widths[largest])
    for k, rows in enumerate(tiers):
        per_row[rows] = widths[k]
    assert plan.average_bits == pytest.approx((float(per_row.sum()) * 16 + 48 * plan["head"]) / (40 * 16 + 48))
    if plan.row_bits["words"]:
        assert "rows at" in plan.table(markdown=False).splitlines()[1]
    # evaluated again: the same size (Ω needs the lookups, so it is unknown)
    evaluated = hessq.plan.evaluate_plan(model, plan, sens)
    assert evaluated.size_bytes == plan.size_bytes and evaluated.row_bits == plan.row_bits
    assert evaluated.average_bits == pytest.approx(plan.average_bits) and evaluated.omega is None
    # a file that loads back the same, and a quantized model with those widths
    plan.save(tmp_path / "plan.json")
    again = BitPlan.load(tmp_path / "plan.json")
    assert again == plan and again.row_bits == plan.row_bits
    q = hessq.quantize(model, again, [x for x, _ in _batches()], pin_first_last=None)
    assert torch.equal(q.words.weight_quantizer.row_bits.long(), per_row)


def test_row_usage_errors_and_tables_that_keep_one_width():
    model = _Table()
    sens = make_sensitivity(model, signature=False)
    counts = lookup_counts(model, _batches())["words"]
    with pytest.raises(hessq.ConfigError, match="not an embedding table"):
        plan_bits(model, sens, weight_bits=(2, 8), pin_first_last=None, row_usage={"head": counts})
    with pytest.raises(hessq.ConfigError, match="has shape"):
        plan_bits(model, sens, weight_bits=(2, 8), pin_first_last=None, row_usage={"words": counts[:5]})
    with pytest.raises(hessq.ConfigError, match="Hessian trace"):
        plan_bits(model, make_sensitivity(model, eigen=True, signature=False), weight_bits=(2, 8),
                  pin_first_last=None, row_usage={"words": counts}, variant="eigenvalue")
    pinned = plan_bits(model, sens, weight_bits=(2, 8), pins={"words": 2}, pin_first_last=None,
                       row_usage={"words": counts})
    assert pinned["words"] == 2 and pinned.row_bits == {}
    with pytest.raises(hessq.ConfigError, match="more than one width"):
        BitPlan({"words": 2, "head": 8}, row_bits={"words": {4: [1, 2], 8: [2]}})
    with pytest.raises(hessq.ConfigError, match="gives no bits"):
        BitPlan({"words": 2, "head": 8}, row_bits={"emb": {4: [1]}})
    with pytest.raises(hessq.ConfigError, match="from 2 to 8"):
        BitPlan({"words": 2, "head": 8}, row_bits={"words": {9: [1]}})


def _three_tiers():
    """The table, its sensitivity, its lookups and its 3 tiers."""
    model = _Table()
    counts = lookup_counts(model, _batches())["words"]
    return model, make_sensitivity(model, signature=False), counts, tiers_of(counts, 3)


def test_pareto_frontier_over_row_tiers():
    model, sens, counts, tiers = _three_tiers()
    usage = {"words": counts}
    frontier = hessq.pareto_frontier(model, sens, weight_bits=(2, 4, 8), num_points=12, pin_first_last=None,
                                     row_usage=usage, row_tiers=3)
    # from all rows at 2 bits to all at 8: the sizes of the tier assignments at the two ends
    assert frontier[0].size_bytes == _size(tiers, (2,) * 3, 2) and frontier[-1].size_bytes == _size(tiers, (8,) * 3, 8)
    assert any(p.plan.row_bits.get("words") for p in frontier)  # some point splits the table
    for a, b in zip(frontier, frontier[1:]):
        assert a.size_bytes < b.size_bytes and a.omega > b.omega
    for p in frontier:  # each point is plan_bits at its limit, folded the same way
        alone = plan_bits(model, sens, weight_bits=(2, 4, 8), size_limit=p.size_limit, pin_first_last=None,
                          row_usage=usage, row_tiers=3)
        assert p.omega == pytest.approx(alone.omega, rel=1e-9) and p.size_bytes <= p.size_limit
        assert p.plan.size_bytes == p.size_bytes and p.plan.average_bits is not None


def test_measured_tier_traces_replace_the_lookup_share():
    from hessq.sensitivity import RowTrace

    model, sens, counts, tiers = _three_tiers()
    usage = {"words": counts}
    common = dict(weight_bits=(2, 4, 8), size_limit=_size(tiers, (2, 4, 8), 4), pin_first_last=None,
                  row_usage=usage, row_tiers=3, stderr_margin=0)
    shared = plan_bits(model, sens, **common)
    # traces equal to the lookup share give the same plan and the same Ω
    trace = sens["words"].trace
    as_shared = [RowTrace(rows, trace * float(counts[rows].sum() / counts.sum()), 0.0, 1) for rows in tiers]
    same = plan_bits(model, sens, **common, row_traces={"words": as_shared})
    assert same == shared and same.omega == pytest.approx(shared.omega, rel=1e-6)
    # the least looked-up tier measured as the most curved: it gets the widest rows the limit allows
    flipped = [RowTrace(rows, t, 0.0, 1) for rows, t in zip(tiers, (trace * 1e-3, trace * 1e-3, trace * 10))]
    plan = plan_bits(model, sens, **common, row_traces={"words": flipped})
    widths = [t["bits"] for t in plan.layers["words"]["row_tiers"]]
    assert widths[2] == max(widths) > min(widths)
    assert plan.omega == pytest.approx(_omega_traces(model, sens, tiers, [t.trace for t in flipped], widths,
                                                      plan["head"]), rel=1e-6)
    # a non-positive measured trace is taken as least sensitive, not as rewarding error
    negative = plan_bits(model, sens, **common, row_traces={"words": [RowTrace(r, -1.0, 0.0, 1) for r in tiers]})
    floor = NEGATIVE_FLOOR * max(abs(sens[n].mean_trace) for n in ("words", "head"))  # per weight, as a layer's
    neg_widths = [t["bits"] for t in negative.layers["words"]["row_tiers"]]
    w = model.words.weight.detach()
    assert negative.layers["words"]["omega"] == pytest.approx(
        sum(floor * RowQuantizer(b).squared_error(w[rows]) for rows, b in zip(tiers, neg_widths)), rel=1e-6)
    # ... unless the plan is on each curvature's magnitude: then |−1| is each tier's trace
    by_size = plan_bits(model, sens, **common, curvature="magnitude",
                        row_traces={"words": [RowTrace(r, -1.0, 0.0, 1) for r in tiers]})
    size_widths = [t["bits"] for t in by_size.layers["words"]["row_tiers"]]
    assert by_size.layers["words"]["omega"] == pytest.approx(
        sum(1.0 / (len(rows) * w.shape[1]) * RowQuantizer(b).squared_error(w[rows]) for rows, b in zip(tiers, size_widths)),
        rel=1e-6)
    with pytest.raises(hessq.ConfigError, match="other row groups"):
        plan_bits(model, sens, **common, row_traces={"words": flipped[:2]})
    with pytest.raises(hessq.ConfigError, match="needs row_usage"):
        plan_bits(model, sens, weight_bits=(2, 8), pin_first_last=None, row_traces={"words": flipped})
    with pytest.raises(hessq.ConfigError, match="row_usage does not"):
        plan_bits(model, sens, **{**common, "row_traces": {"words": flipped, "head": flipped}})


def _omega_traces(model, sens, tiers, traces, tier_bits, head_bits):
    w = model.words.weight.detach()
    return (sum(t / (len(rows) * w.shape[1]) * RowQuantizer(b).squared_error(w[rows])
                for rows, t, b in zip(tiers, traces, tier_bits))
            + sens["head"].mean_trace * quantization_error(model.head.weight, head_bits))
