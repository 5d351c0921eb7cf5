"""A BatchNorm that does not follow a conv (DenseNet's BN-ReLU-Conv) is an integer per-channel affine: a depthwise
1×1 convolution with 8-bit factor codes and an int32 shift."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.ops._endtoend import assert_float_forward_close, end_to_end, warm_batchnorm


class DenseLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 2, 1)
        self.norm = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 4, 3, padding=1)
        self.norm_final = nn.BatchNorm2d(12)

    def forward(self, x):
        f = self.conv0(x)
        y = torch.cat([f, self.conv_b(x)], 1)  # a BatchNorm after a concatenation: nothing to fold into
        z = torch.cat([y, self.conv1(F.relu(self.norm(y)))], 1)
        return F.relu(self.norm_final(z)).mean([2, 3])


def test_standalone_batchnorm_is_a_channel_affine(tmp_path):
    model = warm_batchnorm(DenseLayer(), (2, 6, 6))
    e = end_to_end(model, (2, 6, 6), tmp_path, kinds={"channel_affine"})
    affine = [op for op in e.imodel.ops if op.kind == "channel_affine"]
    assert len(affine) == 2 and not any(op.kind == "channel_affine" for op in e.imodel.layers())
    op = affine[0]
    assert op.tensors["weight"].shape == (8, 1, 1, 1) and op.attrs["groups"] == 8
    assert op.tensors["bias"].dtype == torch.int32
    # the affine's real factor is the BatchNorm's γ/σ within half a weight step per channel
    bn = model.norm
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
    w_scale = factor.abs() / 127
    assert ((op.tensors["weight"].reshape(-1).double() * w_scale - factor).abs() <= w_scale / 2 + 1e-12).all()
    assert_float_forward_close(e.qmodel, e.imodel, e.x, e.y_int)
    with torch.no_grad():
        assert (e.y_int - model(e.x)).abs().max() <= 0.1 * model(e.x).abs().max()
