"""The small models the tests share: one definition each, built in milliseconds, on 8×8 or 6×6 inputs.

- :class:`TinyNet` (:func:`tiny_net`, :func:`trained_tiny_net`, :func:`digits_data`): conv-BN-ReLU with a
  residual add, pooling and a linear head on scikit-learn's digits: every op the pipeline carries.
- :class:`TinyResNet` and :func:`make_sensitivity`: a stem, one residual block with a 1×1 shortcut conv
  (a tied layer) and a linear head, with made-up per-layer sensitivities, for the planner.
- :class:`TinyBN`: BatchNorm statistics of a reachable input distribution, for distillation;
  :func:`bn_features`: conv + BN with no classifier.
- :func:`mlp` (float64, with Tanh) and :func:`digits_batches`: exact-Hessian-sized model and data;
  :func:`conv_relu_linear`: the smallest conv classifier.

Module-level callables double as the CLI's ``--model tests._models:tiny_net`` and
``--data tests._models:digits_data``.
"""

from __future__ import annotations

import torch
from torch import nn

from hessq.data import TensorBatches, digits
from hessq.graph import quantizable_layers
from hessq.sensitivity import LayerSensitivity, Sensitivity, model_signature

#: The input shape of :class:`TinyResNet` and :class:`TinyNet` (one 8×8 channel: the digits).
SHAPE = (1, 8, 8)


# --- the pipeline's tiny net -------------------------------------------------------------------------------


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
    """The untrained :class:`TinyNet`, seeded."""
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
    """(train, eval) batches of scikit-learn's digits."""
    return digits("train", batch_size=64), digits("test", batch_size=128)


# --- the planner's residual net and made-up sensitivities ---------------------------------------------------


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


def make_sensitivity(model: nn.Module, seed: int = 0, eigen: bool = False, signature: bool = True) -> Sensitivity:
    """Made-up traces for every quantizable layer: mean traces log-uniform over 10^-2..10^2, no error."""
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


# --- distillation --------------------------------------------------------------------------------------------


class TinyBN(nn.Module):
    """conv -> bn -> relu -> conv -> bn -> pool -> fc on 2×6×6 inputs, with BatchNorms *defined* in reverse order of use."""

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


def bn_features() -> nn.Module:
    """conv + BatchNorm on 2×6×6 inputs, no classifier: its outputs are feature maps, not (batch, classes) logits."""
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))


# --- exact-Hessian-sized models and data ---------------------------------------------------------------------


def mlp() -> nn.Module:
    """Pool to 4×4, then Linear-Tanh-Linear-ReLU-Linear to 10 classes; float64, seeded, in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 10)
    ).double().eval()


def digits_batches(sizes=(40, 20)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive digits batches of the given (unequal) sizes, float64."""
    data = digits("train", batch_size=sum(sizes), shuffle=False)
    x, y = next(iter(data))
    x = x.double()
    out, start = [], 0
    for n in sizes:
        out.append((x[start : start + n], y[start : start + n]))
        start += n
    return out


def conv_relu_linear(classes: int = 10) -> nn.Module:
    """Conv(1→4, 3×3) → ReLU → Linear on 1×8×8 inputs: the smallest conv classifier; seeded, in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, classes)).eval()
