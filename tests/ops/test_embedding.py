"""Embedding tables: per-row (and row-group) weight quantization against the formula, the integer lookup against the
fake-quant lookup, constant-id lookups folded to constants, and the exact ONNX export of a lookup."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import hessq
from hessq.ops.embedding import QuantEmbedding
from hessq.quantizer._functional import CLIP_RATIOS


def _candidates(block: torch.Tensor, bits: int, ratios) -> list[torch.Tensor]:
    """The block quantized with one scale c·max|w|/qmax for each clip c (of ``ratios``) whose squared error is the
    least, to within float rounding: where two clips tie to the last bits, either is the method's answer."""
    qmax = 2 ** (bits - 1) - 1
    tried = []
    for c in ratios:
        s = (c * block.abs().max() / qmax).clamp(min=1e-12)
        q = torch.clamp(torch.round(block / s), -qmax, qmax) * s
        tried.append((float((q - block).pow(2).sum()), q))
    least = min(err for err, _ in tried)
    return [q for err, q in tried if err <= least * (1 + 1e-5) + 1e-12]


def _reference(weight: torch.Tensor, bits: int, groups: list[range], ratios=(1.0,), got: torch.Tensor | None = None):
    """Symmetric quantization with one scale per group of rows, written from the formula: each group's scale is
    c·max|w|/qmax with the clip c (of ``ratios``; default 1) of least squared error. With ``got``, each group is
    checked to be one of its near-optimal candidates, and the reference takes that one."""
    out = torch.empty_like(weight)
    for rows in groups:
        block = weight[rows.start:rows.stop].detach()
        options = _candidates(block, bits, ratios)
        pick = options[0]
        if got is not None:
            close = [q for q in options if torch.allclose(got[rows.start:rows.stop], q, rtol=1e-6, atol=0)]
            assert close, f"rows {rows} are not quantized with a least-error clip"
            pick = close[0]
        out[rows.start:rows.stop] = pick
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rows_and_row_groups_follow_the_formula(bits):
    torch.manual_seed(bits)
    emb = nn.Embedding(10, 64)
    with torch.no_grad():
        emb.weight.mul_(torch.linspace(0.1, 3, 10).unsqueeze(1))  # rows of very different ranges
    per_row = QuantEmbedding(emb, bits, 8)
    grouped = QuantEmbedding(emb, bits, 8, "group", 3)  # 3 groups of 10 rows: 4, 4 and the 2 left over
    whole = QuantEmbedding(emb, bits, 8, "tensor")
    layouts = [(per_row, [range(r, r + 1) for r in range(10)]), (grouped, [range(0, 4), range(4, 8), range(8, 10)]),
               (whole, [range(0, 10)])]
    for q, groups in layouts:
        got = q.weight_quantizer(q.weight).detach()
        assert torch.allclose(got, _reference(emb.weight, bits, groups, CLIP_RATIOS, got), rtol=1e-6, atol=0)
        # the clip never rounds worse than max |w| (ratio 1 is a candidate), and at 2 bits much better
        err = float((got - emb.weight).detach().pow(2).sum())
        err_max = float((_reference(emb.weight, bits, groups) - emb.weight).pow(2).sum())
        assert err <= err_max
        if bits == 2:
            assert err < 0.8 * err_max
    # the integer codes and scales are the fake-quant table's, bit for bit
    codes, scale = per_row.integer_weight()
    assert torch.equal((codes.double() * scale.unsqueeze(1)).float(), per_row.weight_quantizer(per_row.weight).detach())


def test_row_clip_is_searched_again_for_a_new_weight_in_eval_mode():
    torch.manual_seed(0)
    q = QuantEmbedding(nn.Embedding(20, 32), 2, 8).eval()
    first = q.weight_quantizer.scale(q.weight).clone()
    with torch.no_grad():
        q.weight[:, :4].mul_(10)  # an in-place step: new outliers in every row
    again = q.weight_quantizer.scale(q.weight)
    fresh = QuantEmbedding(nn.Embedding(20, 32), 2, 8).eval()
    fresh.weight = nn.Parameter(q.weight.detach().clone())
    assert not torch.equal(first, again)
    assert torch.equal(again, fresh.weight_quantizer.scale(fresh.weight))


class TinyText(nn.Module):
    """Word and position embeddings (the positions a constant of the length), a linear head on the first token."""

    def __init__(self, vocab: int = 30, dim: int = 8) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, dim, padding_idx=0)
        self.positions = nn.Embedding(16, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        positions = torch.arange(ids.size(1), device=ids.device).unsqueeze(0)
        h = self.words(ids) + self.positions(positions)
        return self.head(h[:, 0] + h[:, 1])


def _ids(seed: int, n: int = 6, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (n, length), generator=g)


@pytest.mark.parametrize("w_bits", [4, 8])
def test_integer_lookup_is_the_fake_quant_lookup(tmp_path, w_bits):
    torch.manual_seed(0)
    model = TinyText().eval()
    layers = hessq.quantizable_layers(model)
    assert list(layers) == ["words", "positions", "head"]  # tables are quantizable layers with their own bits
    q = hessq.quantize(model, {"words": (w_bits, 8), "positions": (w_bits, 8), "head": 8}, [(_ids(i),) for i in range(3)])
    ids = _ids(9)
    imodel = hessq.to_integer(q)
    kinds = [op.kind for op in imodel.ops]
    assert kinds.count("embedding") == 1 and kinds.count("constant") == 1  # positions: a constant of the length
    y = imodel(ids)
    assert torch.equal(q(ids), y)
    # the lookup, from the formula: each row's codes at its own scale, rounded onto the output grid
    words = q.words
    # (the padding row is zeros: its scale is floored at 1e-12, as every scale is)
    per_row = [range(r, r + 1) for r in range(words.weight.shape[0])]
    rows = _reference(words.weight, w_bits, per_row, CLIP_RATIOS, words.weight_quantizer(words.weight).detach())
    exact = rows.double()[ids] / words.output_quantizer.scale.double()
    expected = torch.clamp(torch.round(exact), words.output_quantizer.qmin, words.output_quantizer.qmax)
    op = next(o for o in imodel.ops if o.kind == "embedding")
    got = imodel.run(ids, keep=True)[op.output]
    # the dyadic multiplier is within 2^-30 of s_row / S: it rounds the other way only at a tie
    near_tie = ((exact - exact.floor()) - 0.5).abs() < 1e-6
    assert torch.equal(got[~near_tie], expected[~near_tie].long())
    assert (got - expected).abs().max() <= 1
    # the fake-quant lookup computes the same codes
    with torch.no_grad():
        fq = words(ids) / words.output_quantizer.scale
    assert torch.equal(torch.round(fq)[~near_tie], expected[~near_tie].float())
    # the exact ONNX export takes the ids as int64 and reproduces the program bit for bit
    hessq.export_onnx(imodel, tmp_path / "text.onnx")
    session = ort.InferenceSession(str(tmp_path / "text.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(int64)"
    assert np.array_equal(session.run(None, {"input": ids.numpy()})[0], y.numpy())
    # ... with the table as int8 codes, one byte per weight (a float64 table made BERT's exact file 5× larger)
    import onnx

    inits = {i.name: i for i in onnx.load(str(tmp_path / "text.onnx")).graph.initializer}
    tables = [i for i in inits.values() if list(i.dims) == list(words.weight.shape)]
    assert [t.data_type for t in tables] == [onnx.TensorProto.INT8]
    # 4-bit tables are stored packed
    imodel.save(tmp_path / "text.hq")
    assert torch.equal(hessq.load_integer(tmp_path / "text.hq")(ids), y)


def test_lookups_cost_no_macs_and_train_by_ste():
    torch.manual_seed(0)
    model = TinyText()
    q = hessq.quantize(model, 4, [(_ids(i),) for i in range(2)], pin_first_last=None)
    family = hessq.ops.family_of_module(model.words)
    assert family.name == "embedding" and family.macs(q.words, (_ids(0),), q.words(_ids(0))) == 0
    q.train()
    ids = _ids(3)
    q(ids).pow(2).sum().backward()
    grad = q.words.weight.grad
    used = torch.zeros(30, dtype=torch.bool)
    used[ids[:, :2].flatten()] = True  # the head reads the first two tokens
    used[0] = False  # the padding row takes no gradient, as in nn.Embedding
    assert (grad[used].abs().sum(1) > 0).all() and (grad[~used] == 0).all()
    assert q.positions.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_eval_lookup_rounds_only_the_rows_read_with_the_same_numbers(granularity):
    # without a graph, only the looked-up rows are quantized; that must equal quantizing the whole table first
    torch.manual_seed(0)
    model = TinyText()
    q = hessq.quantize(model, 3, [(_ids(i),) for i in range(2)], pin_first_last=None,
                       weight_granularity=granularity, num_groups=4)
    q.eval()
    ids = _ids(5)
    with torch.no_grad():
        fast = q.words(ids)
    whole = q.words(ids)  # the weight needs a gradient here: the whole table is fake-quantized, then looked up
    assert whole.requires_grad and torch.equal(fast, whole.detach())


def test_rows_of_their_own_widths_follow_the_formula_and_the_integer_lookup_matches(tmp_path):
    # a plan's row tiers: each row quantized at its own width, with its own least-error clip at that width
    torch.manual_seed(0)
    model = TinyText().eval()
    widths = torch.tensor([2, 8, 4, 2, 3] * 6, dtype=torch.int8)
    plan = hessq.BitPlan({"words": 2, "positions": 8, "head": 8},
                         row_bits={"words": {b: [r for r in range(30) if widths[r] == b] for b in (3, 4, 8)}})
    q = hessq.quantize(model, plan, [(_ids(i),) for i in range(3)])
    words = q.words
    assert torch.equal(words.weight_quantizer.row_bits, widths)
    got = words.weight_quantizer(words.weight).detach()
    for r in range(30):  # row by row, from the formula at the row's width
        _reference(words.weight[r:r + 1], int(widths[r]), [range(0, 1)], CLIP_RATIOS, got[r:r + 1])
    codes, scale = words.integer_weight()
    assert all(int(codes[r].abs().max()) <= 2 ** (int(widths[r]) - 1) - 1 for r in range(30))
    assert int(codes[widths == 8].abs().max()) > 7  # wide rows do use their wider grid
    assert torch.equal((codes.double() * scale.unsqueeze(1)).float(), got)
    ids = _ids(9)
    with torch.no_grad():  # the eval lookup (only the rows read) equals the whole table's
        assert torch.equal(words(ids), words.output_quantizer(torch.nn.functional.embedding(ids, got)))
    imodel = hessq.to_integer(q)
    assert torch.equal(q(ids), imodel(ids))
    # the .hq file packs each width's rows at that width, and loads back the same program
    imodel.save(tmp_path / "rows.hq")
    again = hessq.load_integer(tmp_path / "rows.hq")
    assert torch.equal(again(ids), imodel(ids))
    op = next(o for o in again.ops if o.kind == "embedding")
    assert torch.equal(op.tensors["weight"], codes.to(torch.int8)) and torch.equal(op.tensors["row_bits"], widths)
    _, stored = imodel._payload()
    index = next(i for i, o in enumerate(imodel.ops) if o.kind == "embedding")
    table_bytes = sum(t.numel() for name, t in stored.items() if name.startswith(f"{index}.weight."))
    assert table_bytes == sum(-(-int((widths == b).sum()) * 8 * b // 8) for b in (2, 3, 4, 8))  # 8 columns
    hessq.export_onnx(imodel, tmp_path / "rows.onnx")
    session = ort.InferenceSession(str(tmp_path / "rows.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"input": ids.numpy()})[0], imodel(ids).numpy())


def test_row_widths_out_of_range_or_for_the_wrong_table_are_refused():
    from hessq.ops.embedding import RowQuantizer

    with pytest.raises(hessq.ConfigError, match="from 2 to 8"):
        RowQuantizer(2).set_row_bits(torch.tensor([2, 9]))
    with pytest.raises(hessq.ConfigError, match="one scale per row"):
        RowQuantizer(2, "group", 2).set_row_bits(torch.tensor([2, 4]))
    model = TinyText().eval()
    with pytest.raises(hessq.ConfigError, match="not a quantized embedding table"):
        hessq.quantize(model, hessq.BitPlan({"words": 2, "positions": 8, "head": 8}, row_bits={"head": {4: [0]}}),
                       [(_ids(0),)])
    with pytest.raises(hessq.ConfigError, match="row 30 of 'words'"):
        hessq.quantize(model, hessq.BitPlan({"words": 2, "positions": 8, "head": 8}, row_bits={"words": {4: [30]}}),
                       [(_ids(0),)])
