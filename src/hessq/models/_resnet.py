"""CIFAR-style ResNet-20 (He et al. 2016, §4.2) with 1×1-conv shortcuts where the shape changes."""

from __future__ import annotations

from importlib import resources

import torch
from torch import nn

from hessq._errors import ConfigError

CHECKPOINT = "resnet20_fashion_mnist.pt"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks: tuple[int, int, int] = (3, 3, 3), in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers = []
        in_planes = 16
        for planes, blocks, stride in zip((16, 32, 64), num_blocks, (1, 2, 2)):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def resnet20(pretrained: bool = False, in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """ResNet-20: 3 stages × 3 basic blocks, 16/32/64 channels, 22 conv/linear layers.

    ``pretrained=True`` loads the bundled Fashion-MNIST checkpoint (trained by
    ``scripts/train_resnet20.py``), which needs ``in_channels=1, num_classes=10``.
    """
    model = ResNet((3, 3, 3), in_channels=in_channels, num_classes=num_classes)
    if pretrained:
        if in_channels != 1 or num_classes != 10:
            raise ConfigError(
                "the bundled checkpoint is for Fashion-MNIST (in_channels=1, num_classes=10); "
                f"got in_channels={in_channels}, num_classes={num_classes}. Use pretrained=False to train your own."
            )
        ref = resources.files("hessq.models").joinpath(CHECKPOINT)
        if not ref.is_file():
            raise FileNotFoundError(
                f"the bundled checkpoint {CHECKPOINT} is missing from the hessq package; "
                "reinstall hessq or run scripts/train_resnet20.py to recreate it"
            )
        with resources.as_file(ref) as path:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    model.eval()
    return model
