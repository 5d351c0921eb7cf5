"""A small conv net on scikit-learn's 8×8 digits: the whole pipeline in seconds."""

from __future__ import annotations

import base64
import re

import torch
from torch import nn

from hessq.data import TensorBatches, digits


class TinyNet(nn.Module):
    """conv-BN-ReLU ×2 with a residual add, pooling and a linear head: every op the pipeline must carry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_net() -> nn.Module:
    """The untrained architecture (the CLI's ``--model tests.pipeline._tiny:tiny_net``)."""
    torch.manual_seed(0)
    return TinyNet()


def trained_tiny_net(epochs: int = 15) -> nn.Module:
    """TinyNet trained on the digits training split (about 2 s on one core; ~95% test top-1)."""
    model = tiny_net()
    train = digits("train", batch_size=64, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def digits_data() -> tuple[TensorBatches, TensorBatches]:
    """(train, eval) batches: the CLI's ``--data tests.pipeline._tiny:digits_data``."""
    return digits("train", batch_size=64), digits("test", batch_size=128)


def not_a_model() -> str:
    return "a string"


#: What a compress run with an output folder writes (besides pareto.json and latency.json), and the report's plots.
FILES = ("sensitivity.json", "plan.json", "model.hq", "model.onnx", "results.json", "results.md", "report.html")
PLOTS = ("accuracy-size", "sensitivity", "pareto", "bits")


def plots(html: str) -> dict[str, bytes]:
    """The report's embedded PNG plots by id."""
    found = re.findall(r"<img id=([\w-]+) alt='[^']*' src='data:image/png;base64,([^']+)'", html)
    return {name: base64.b64decode(data) for name, data in found}
