"""Multi-head self-attention in integers: integer projections, q·kᵀ and p·v as matmuls of codes, softmax by an
exponential table and an integer division; bit for bit the quantized model's eval mode and the exact ONNX export."""

from __future__ import annotations

import math

import torch
from torch import nn

from tests.ops._endtoend import assert_float_forward_close, end_to_end


class Encoder(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attention(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


def test_self_attention_runs_in_integers(tmp_path):
    e = end_to_end(Encoder().eval(), (6, 4), tmp_path, kinds={"matmul", "softmax", "attn_linear"})
    assert_float_forward_close(e.qmodel, e.imodel, e.x, e.y_int)
    # each probability is the softmax of the score codes' real values on the grid of step 1/255, within one step:
    # the exponential table holds 16 fraction bits, the division rounds half up
    values = e.values()
    softmax = e.op("softmax")
    producer = next(o for o in e.imodel.ops if o.output == softmax.inputs[0])
    logits = values[softmax.inputs[0]].double() * producer.scale.double()
    p = values[softmax.output]
    assert ((p.double() / 255 - torch.softmax(logits, -1)).abs() <= 1 / 255).all()
    assert (p.sum(-1) - 255).abs().max() <= p.shape[-1]  # each rounds by at most half a step
    # the attention's projections take no bits from the plan: the plan's layers are the model's own calls
    assert set(e.qmodel.layer_bits) == {"embed", "head"}
    assert math.isfinite(float(e.y_fast.sum()))
