"""A small residual model and made-up sensitivities for the plan tests."""

import torch
from torch import nn

from hessq.graph import quantizable_layers
from hessq.sensitivity import LayerSensitivity, Sensitivity, model_signature


class TinyResNet(nn.Module):
    """stem conv → one residual block with a 1×1 shortcut conv → linear: 5 quantizable layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.c1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn_c1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_c2 = nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn_c1(self.c1(x)))
        out = self.bn_c2(self.c2(out))
        out = self.relu(out + self.shortcut(x))
        return self.fc(torch.flatten(self.pool(out), 1))


def make_sensitivity(model, seed=0, eigen=False, signature=True):
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in quantizable_layers(model).items():
        n = m.weight.numel()
        mean = float(10 ** (torch.rand((), generator=gen) * 4 - 2))
        layers[name] = LayerSensitivity(
            trace=mean * n,
            trace_stderr=0.0,
            top_eigenvalue=mean * n * 3.0 if eigen else None,
            num_params=n,
        )
    return Sensitivity(layers, model_signature(model) if signature else None, {"made_by": "test"})


SHAPE = (1, 8, 8)
