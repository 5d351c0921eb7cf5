"""A tiny BatchNorm model for distillation tests: runs in milliseconds."""

from __future__ import annotations

import torch
from torch import nn


class TinyBN(nn.Module):
    """conv -> bn -> relu -> conv -> bn -> pool -> fc, with BatchNorms *defined* in reverse order of use."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.bn_late = nn.BatchNorm2d(6)  # defined first, called second
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn_early = nn.BatchNorm2d(4)  # defined second, called first
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        # Running statistics of a reachable input distribution (so the optimum is near zero).
        for bn in (self.bn_early, self.bn_late):
            bn.momentum = None  # cumulative average
        self.train()
        with torch.no_grad():
            for _ in range(4):
                self(torch.randn(64, 2, 6, 6, generator=g) * 2 + 0.5)
        self.eval()

    def forward(self, x):
        x = torch.relu(self.bn_early(self.conv1(x)))
        x = self.bn_late(self.conv2(x))
        return self.fc(x.mean((2, 3)))
