import pytest
import torch

import hessq
from hessq.models import resnet20


def test_resnet20_structure():
    model = resnet20()
    layers = hessq.quantizable_layers(model)
    assert len(layers) == 22
    assert list(layers)[:2] == ["conv1", "layer1.0.conv1"] and list(layers)[-1] == "fc"
    assert "layer3.0.shortcut.0" in layers
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert resnet20(in_channels=3, num_classes=100)(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


def test_pretrained_checkpoint_reaches_92_percent(pretrained_resnet20, fashion_test):
    assert hessq.accuracy(pretrained_resnet20, fashion_test) >= 0.92


def test_pretrained_needs_the_fashion_mnist_shape():
    with pytest.raises(ValueError, match="in_channels=1, num_classes=10"):
        resnet20(pretrained=True, num_classes=100)
