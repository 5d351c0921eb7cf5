"""Float where the plan or the model says so: a plan of all None is the FP32 model (adds, concatenations and
activations whose inputs are all float stay float), and with unsupported='float' the quantizable layers left in
float inside an op hessq cannot quantize are named in a warning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = x + F.silu(self.a(x))
        z = torch.cat([y, x * torch.sigmoid(self.b(y))], 1)
        return self.fc(z.mean([2, 3]))


def test_a_plan_of_all_none_is_the_fp32_model():
    model = Block().eval()
    calib = [(torch.randn(8, 2, 6, 6),)]
    q = hessq.quantize(model, {name: None for name in ("stem", "a", "b", "fc")}, calib, pin_first_last=None)
    assert not hessq.graph.act_quantizers(q)  # nothing is quantized: no add, cat, product or table either
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), rtol=1e-6, atol=1e-6)


def test_a_float_layer_feeding_a_quantized_op_keeps_it_quantized():
    q = hessq.quantize(Block().eval(), {"stem": 8, "a": None, "b": 8, "fc": 8}, [(torch.randn(8, 2, 6, 6),)],
                       pin_first_last=None)
    kinds = {type(m).__name__ for m in q.modules()}
    assert {"QuantAdd", "QuantCat", "QuantMul"} <= kinds  # each has an input from a quantized layer


def test_a_plan_of_all_none_is_the_fp32_bert():
    from tests._bert import tiny_bert, token_batch

    model = tiny_bert(layers=1, dropout=0.0)
    names = hessq.graph.quantizable_layers(model)
    # it used to fail widening the residual stream: a float LayerNorm has no input quantizer
    q = hessq.quantize(model, {name: None for name in names}, [token_batch(0)], pin_first_last=None)
    assert not hessq.graph.act_quantizers(q)
    batch = token_batch(1)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(q(batch["input_ids"]), want, rtol=1e-5, atol=1e-6)  # the mask derives from the pad id


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_float_fallback_names_the_layers_it_leaves_in_float():
    calib = [(torch.randn(4, 5, 4),)]
    with pytest.warns(UserWarning, match=r"encoder\.self_attn\.out_proj, encoder\.linear1, encoder\.linear2"):
        q = hessq.quantize(Attention().eval(), 8, calib, unsupported="float")
    assert any("TransformerEncoderLayer" in op for op in q.float_ops)
