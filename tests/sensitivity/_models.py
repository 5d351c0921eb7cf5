"""Small models and data for exact-Hessian tests (float64, scikit-learn digits)."""

from __future__ import annotations

import torch
from torch import nn

from tests._models import digits_batches as batches, mlp  # noqa: F401  (shared with the other test folders)


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.tanh(self.conv2(x)))
        return self.fc(x.flatten(1))


def convnet() -> nn.Module:
    torch.manual_seed(1)
    m = SmallConvNet()
    with torch.no_grad():  # non-trivial running statistics, as after training
        m.bn1.running_mean.uniform_(-0.2, 0.2)
        m.bn1.running_var.uniform_(0.5, 1.5)
    return m.double().eval()


class TinyResNet(nn.Module):
    """Piecewise linear: conv, BN (eval), ReLU, a residual add, max-pool, a strided conv and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        h = torch.nn.functional.relu6(self.conv3(self.pool(h)))
        return self.fc(h.flatten(1))


def resnet_tiny() -> nn.Module:
    torch.manual_seed(2)
    m = TinyResNet()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return m.double().eval()


def silu_net() -> nn.Module:
    """Smooth non-linearities (SiLU, GELU) after the first two layers: only the last is linear in the output."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 12), nn.GELU(), nn.Linear(12, 10)
    ).double().eval()


def exact_block_hessians(model: nn.Module, data, loss_fn=nn.functional.cross_entropy) -> dict[str, torch.Tensor]:
    """Each Conv2d/Linear weight's exact Hessian block of the mean loss over all ``data``."""
    from torch.func import functional_call

    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    params = dict(model.named_parameters())
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            key = f"{name}.weight"

            def f(w, key=key):
                return loss_fn(functional_call(model, {**params, key: w}, (x,)), y)

            w = params[key].detach()
            h = torch.autograd.functional.hessian(f, w, vectorize=True)
            out[name] = h.reshape(w.numel(), w.numel())
    return out
