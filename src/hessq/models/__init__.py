"""Models bundled with hessq."""

from hessq.models._resnet import BasicBlock, ResNet, resnet20

__all__ = ["BasicBlock", "ResNet", "resnet20"]
