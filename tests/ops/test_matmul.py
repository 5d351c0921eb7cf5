"""Activation × activation matmuls (fake quantization against the formula, exact integer products, exact ONNX) and
the Linear weight groupings: Q-BERT's row groups and GPTQ/AWQ-style input-column blocks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hessq
from hessq.ops import IntegerConversionError, QuantLinear, QuantMatmul, matmul_macs
from hessq.quantizer import ActQuantizer
from tests.ops._endtoend import assert_float_forward_close, calibration, end_to_end


def test_matmul_macs():
    assert matmul_macs((2, 4, 5, 8), (2, 4, 8, 5)) == 2 * 4 * 5 * 8 * 5  # q·kᵀ of 2 sequences, 4 heads, 5 tokens
    assert matmul_macs((3, 6, 7), (7, 2)) == 3 * 6 * 7 * 2  # a shared right operand broadcasts
    assert matmul_macs((7,), (7, 2)) == 14
    with pytest.raises(ValueError, match="inner sizes"):
        matmul_macs((2, 3), (4, 5))


def _grid(x: torch.Tensor, q: ActQuantizer) -> torch.Tensor:
    return torch.clamp(torch.round(x / q.scale), q.qmin, q.qmax) * q.scale


class ScoresNet(nn.Module):
    """q·kᵀ scaled, then p·v with p from a softmax: both act × act products of an attention."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        scores = torch.matmul(self.q(x), self.k(x).transpose(-1, -2)) * 6**-0.5
        return self.head(torch.softmax(scores, -1) @ self.v(x))


def test_act_matmul_in_integers(tmp_path):
    torch.manual_seed(0)
    e = end_to_end(ScoresNet().eval(), (5, 4), tmp_path, kinds={"matmul", "masked_softmax"})
    products = [m for m in e.qmodel.modules() if isinstance(m, QuantMatmul)]
    assert len(products) == 2
    # fake quantization: each input on its own grid, the product exact; the probabilities' grid is softmax's [0, 1]
    first, second = products
    a, b = torch.randn(2, 5, 6), torch.randn(2, 6, 5)
    assert torch.equal(first(a, b), _grid(a, first.quantizer_a) @ _grid(b, first.quantizer_b))
    assert second.quantizer_a.bound == (0.0, 1.0) and float(second.quantizer_a.scale) == pytest.approx(1 / 255)
    # integer: the matmul of the codes, exactly
    values = e.values()
    for op in (o for o in e.imodel.ops if o.kind == "matmul"):
        assert torch.equal(values[op.output], values[op.inputs[0]] @ values[op.inputs[1]])
    # the probabilities reach p·v unchanged: their grid is the matmul's input grid
    softmax = e.op("masked_softmax")
    requant = next(o for o in e.imodel.ops if o.inputs == [softmax.output])
    assert torch.equal(values[requant.output], values[softmax.output])
    assert_float_forward_close(e.qmodel, e.imodel, e.x, e.y_int)


def _row_groups_reference(w: torch.Tensor, bits: int, rows_per_group: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    for start in range(0, w.shape[0], rows_per_group):
        part = w[start:start + rows_per_group]
        s = part.abs().max() / qmax
        out[start:start + rows_per_group] = torch.clamp(torch.round(part / s), -qmax, qmax) * s
    return out


def _blocks_reference(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], block):
            part = w[r, start:start + block]
            s = part.abs().max() / qmax
            out[r, start:start + block] = torch.clamp(torch.round(part / s), -qmax, qmax) * s
    return out


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_linear_row_groups_and_input_blocks_follow_the_formula(bits):
    torch.manual_seed(bits)
    linear = nn.Linear(10, 8)
    family = hessq.ops.family_of_module(linear)
    groups = family.quantized_module(linear, bits, 8, "group", 4)
    assert torch.equal(groups.weight_quantizer(groups.weight), _row_groups_reference(linear.weight, bits, 2))
    # blocks of 4 input columns in each row: 4, 4 and the 2 left over
    blocks = family.quantized_module(linear, bits, 8, "block", 1, block_size=4)
    assert torch.equal(blocks.weight_quantizer(blocks.weight), _blocks_reference(linear.weight, bits, 4))
    channel = family.quantized_module(linear, bits, 8, "channel", 1)
    assert torch.equal(channel.weight_quantizer(channel.weight), _row_groups_reference(linear.weight, bits, 1))
    assert isinstance(blocks, QuantLinear) and blocks.weight_quantizer.scale(blocks.weight).shape == (8, 3)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_block_granularity_evaluates_in_float_and_has_no_integer_model():
    torch.manual_seed(0)
    q = hessq.quantize(Mlp(), 4, calibration((8,)), weight_granularity="block", block_size=4, pin_first_last=None)
    x = calibration((8,), 1, 4, seed=5)[0][0]
    with pytest.warns(UserWarning, match="block"):
        y = q(x)
    assert torch.equal(y, q.float_forward(x)) and not q.integer_eval
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        q(x)
    with pytest.raises(IntegerConversionError, match="granularity='block'"):
        hessq.to_integer(q)
    # the bias sits on each row's largest block scale times the input scale: an int32 grid
    fc1 = q.fc1
    w_q, b_q = fc1.quantized_weight_and_bias()
    grid = fc1.weight_quantizer.scale(fc1.weight).amax(1) * fc1.act_quantizer.scale
    assert torch.allclose(b_q / grid, torch.round(b_q / grid), atol=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    ({"weight_granularity": "rows"}, "granularity must be one of"),
    ({"weight_granularity": "group", "num_groups": 0}, "num_groups must be a positive integer"),
    ({"weight_granularity": "block", "block_size": 0}, "block_size must be a positive integer"),
    ({"weight_granularity": "group", "num_groups": 3}, "layer `fc1`.*16 output rows.*3 equal groups"),
])
def test_bad_grouping_is_refused(kwargs, match):
    with pytest.raises(hessq.ConfigError, match=match):
        hessq.quantize(Mlp(), 4, calibration((8,)), **kwargs)
