"""Constants in the integer program: a position embedding added and a class token concatenated (ViT's
patch-token stem) become their codes on the add's or cat's grid; the class token is read back by indexing
(``x[:, 0]``); the linear layers and LayerNorm work on tokens."""

from __future__ import annotations

import torch
from torch import nn

import hessq
from tests.ops._endtoend import assert_float_forward_close, end_to_end


class Tokens(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(2, dim, 2, stride=2)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, 10, dim) * 0.5)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        n = x.shape[0]
        x = self.patch(x).reshape(n, self.patch.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = x + self.position
        x = x + self.mlp(self.norm(x))
        return self.head(x[:, 0])


def test_position_embedding_and_class_token_are_codes(tmp_path):
    model = Tokens().eval()
    assert hessq.graph.check_supported(hessq.graph.traced(model), unsupported="float") == []
    e = end_to_end(model, (2, 6, 6), tmp_path, kinds={"constant", "layer_norm", "slice"})
    assert_float_forward_close(e.qmodel, e.imodel, e.x, e.y_int)
    # the constants are their rounded codes on the grid of the op that reads them
    values = e.values()
    cat = next(op for op in e.imodel.ops if op.kind == "cat")
    token = values[cat.output][:, :1].double() * cat.scale.double()
    assert ((token - model.class_token.detach().double()).abs() <= cat.scale.double() / 2 + 1e-12).all()
