"""Softmax with a padding mask: fake quantization against the formula, the integer softmax (exponential table,
integer division, masked keys at code 0) against the float function, every spelling of softmax, and a model whose
mask comes from its token ids, bit for bit in the integer model and the exact ONNX export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from hessq.ops import QuantSoftmax
from hessq.ops.softmax import exp_table, masked_softmax, softmax_codes
from tests.ops._endtoend import assert_float_forward_close


def _keep(n: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, 1, t, generator=g) > 0.3
    keep[0] = False  # a row with nothing kept
    keep[1] = True
    return keep


@pytest.mark.parametrize("scale", [0.02, 0.1, 0.4])
def test_integer_softmax_is_the_softmax_within_a_step(scale):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (6, 5, 9), generator=g)
    keep = _keep(6, 9, 1)
    p = softmax_codes(codes, exp_table(scale, 254), 254, 255, keep)
    reference = masked_softmax(codes.double() * scale, keep)
    # I-BERT's bound for its integer softmax, here: the table holds 16 fraction bits, the division rounds half up
    assert ((p.double() / 255 - reference).abs() <= 1 / 255).all()
    assert (p[~keep.expand_as(p)] == 0).all()  # masked keys: probability code 0
    assert (p[0] == 0).all()  # nothing kept: all zeros, as masked_softmax gives
    kept_rows = p[1:].sum(-1)
    assert ((kept_rows - 255).abs() <= keep[1:].sum(-1)).all()  # each kept entry rounds by at most half a step
    # without a mask: the unmasked formula
    assert torch.equal(softmax_codes(codes, exp_table(scale, 254), 254, 255), softmax_codes(codes, exp_table(scale, 254), 254, 255, torch.ones_like(keep)))


def test_fake_quant_softmax_follows_the_formula():
    q_in, q_out = hessq.quantizer.ActQuantizer(8), hessq.quantizer.ActQuantizer(8, bound=(0.0, 1.0))
    x = torch.randn(4, 3, 7) * 3
    q_in.observing = q_out.observing = True
    QuantSoftmax(q_in, q_out)(x)
    q_in.freeze()
    q_out.freeze()
    keep = _keep(4, 7, 2)
    s_in = q_in.scale
    x_q = torch.clamp(torch.round(x / s_in), -127, 127) * s_in
    expected = torch.clamp(torch.round(masked_softmax(x_q, keep) * 255), 0, 255) / 255
    assert torch.allclose(QuantSoftmax(q_in, q_out)(x, keep), expected, atol=1e-7, rtol=0)
    assert float(q_out.scale) == pytest.approx(1 / 255) and not bool(q_out.signed)


class Spellings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.softmax(h, dim=-1) + torch.softmax(h, -1) + h.softmax(-1) + self.softmax(h))


def test_every_spelling_is_the_quantized_softmax():
    from tests.ops._endtoend import calibration

    q = hessq.quantize(Spellings(), 8, calibration((4,)))
    assert sum(isinstance(m, QuantSoftmax) for m in q.modules()) == 4
    assert [op.kind for op in hessq.to_integer(q).ops].count("masked_softmax") == 4


class MaskedAttentionPool(nn.Module):
    """Attention over the tokens with the padding masked out, from the ids: the BERT pattern in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(20, 8, padding_idx=0)
        self.query = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.words(ids)
        keep = (ids != 0).unsqueeze(1)  # [B, 1, T]: keys that are not padding
        p = masked_softmax(torch.matmul(self.query(h), h.transpose(-1, -2)), keep)
        return self.head(torch.matmul(p, h)[:, 0])


def _ids(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (6, 7), generator=g)
    ids[1, 4:] = 0
    ids[2, 1:] = 0
    return ids


def test_padding_mask_in_integers(tmp_path):
    torch.manual_seed(0)
    q = hessq.quantize(MaskedAttentionPool().eval(), 8, [(_ids(i),) for i in range(3)], pin_first_last=None)
    ids = _ids(5)
    ids[3] = 0  # a sequence that is all padding
    imodel = hessq.to_integer(q)
    y = imodel(ids)
    assert torch.equal(q(ids), y)
    values = imodel.run(ids, keep=True)
    softmax = next(op for op in imodel.ops if op.kind == "masked_softmax")
    assert {op.kind for op in imodel.ops} >= {"compare", "unsqueeze", "matmul", "embedding"}
    p = values[softmax.output]
    padded = (ids == 0).unsqueeze(1).expand_as(p)
    assert (p[padded] == 0).all() and (p[3] == 0).all()
    assert (p[~padded].sum() > 0)
    # padded keys change nothing: the sequence without its padding gives the same output
    assert torch.equal(q(ids[1:2, :4]), y[1:2])
    hessq.export_onnx(imodel, tmp_path / "masked.onnx")
    session = ort.InferenceSession(str(tmp_path / "masked.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"input": ids.numpy()})[0], y.numpy())
    assert_float_forward_close(q, imodel, ids, y)
