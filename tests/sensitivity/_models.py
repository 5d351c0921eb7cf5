"""Small models and data for exact-Hessian tests (float64, scikit-learn digits)."""

from __future__ import annotations

import torch
from torch import nn

from hessq.data import digits


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 10)
    ).double().eval()


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


def batches(sizes=(40, 20)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive digits batches of the given (unequal) sizes, float64."""
    data = digits("train", batch_size=sum(sizes), shuffle=False)
    x, y = next(iter(data))
    x = x.double()
    out, start = [], 0
    for n in sizes:
        out.append((x[start : start + n], y[start : start + n]))
        start += n
    return out


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
