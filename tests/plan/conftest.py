import pytest
import torch

from tests._models import TinyResNet, make_sensitivity


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyResNet().eval()


@pytest.fixture
def tiny_sens(tiny):
    return make_sensitivity(tiny)

