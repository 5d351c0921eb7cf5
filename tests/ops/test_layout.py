"""Layout ops move codes on their grid (ShuffleNet's channel shuffle: view, transpose, chunk; permute, split);
arithmetic on sizes and ``torch._assert`` are Python values while compiling; dropout and stochastic depth are the
identity in eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from tests.ops._endtoend import assert_float_forward_close, end_to_end


def channel_shuffle(x, groups):
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.mix = nn.Conv2d(8, 6, 1)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        torch._assert(x.shape[1] == 2, "two input channels")
        x = F.relu(self.conv(x))
        a, b = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((a, F.relu(self.branch(b))), dim=1), 2)
        c, d = torch.split(x, [3, 5], dim=1)
        x = torch.cat([d, c], 1).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        n = x.size(2) * x.size(3)
        y = F.dropout(self.mix(self.drop(x)), 0.2, training=self.training)
        return y.reshape(y.size(0), y.size(1), n).mean(2)


def test_channel_shuffle_and_parts_move_codes_exactly(tmp_path):
    model = Shuffle().eval()
    e = end_to_end(model, (2, 6, 6), tmp_path, kinds={"permute", "slice", "reshape"})
    assert_float_forward_close(e.qmodel, e.imodel, e.x, e.y_int)
    # the layout ops move codes without changing them: the shuffled codes are the cat's codes, permuted
    values = e.values()
    cat = next(op for op in e.imodel.ops if op.kind == "cat")
    shuffled = next(op for op in e.imodel.ops if op.kind == "reshape" and op.inputs[0].startswith("transpose"))
    expect = values[cat.output].view(8, 2, 4, 6, 6).transpose(1, 2).reshape(8, 8, 6, 6)
    assert torch.equal(values[shuffled.output], expect)


def test_size_arithmetic_is_not_an_unsupported_op():
    found = hessq.graph.check_supported(hessq.graph.traced(Shuffle()), unsupported="float")
    assert found == []


def test_stochastic_depth_is_the_identity(tmp_path):
    ops = pytest.importorskip("tests.zoo._torchvision").torchvision_ops()

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
            self.depth = ops.StochasticDepth(0.2, "row")
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            x = F.relu(self.conv(x))
            y = ops.stochastic_depth(self.conv2(x), 0.1, "batch", self.training)
            return self.fc((self.depth(y) + x).mean([2, 3]))

    e = end_to_end(Residual().eval(), (2, 6, 6), tmp_path)
    assert {op.kind for op in e.imodel.ops} <= {"quantize", "conv2d", "relu", "requantize", "add", "sum", "linear", "dequantize"}
