"""The claims on real data: PTQ accuracy, and integer == fake-quant eval on all 10,000 test images."""

import pytest
import torch

import hessq


@pytest.fixture(scope="module")
def calibration():
    from hessq.data import fashion_mnist

    return fashion_mnist("train", batch_size=128, shuffle=True, seed=1).take(8)


@pytest.mark.slow
def test_w8a8_ptq_within_0_3_points_of_fp32(pretrained_resnet20, fashion_test, calibration):
    fp32 = hessq.accuracy(pretrained_resnet20, fashion_test)
    w8a8 = hessq.accuracy(hessq.quantize(pretrained_resnet20, 8, calibration), fashion_test)
    assert fp32 - w8a8 <= 0.003, (fp32, w8a8)


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["w8a8", "mixed"])
def test_integer_model_equals_fake_quant_on_all_test_images(plan, pretrained_resnet20, fashion_test, calibration):
    layers = list(hessq.quantizable_layers(pretrained_resnet20))
    bits = 8 if plan == "w8a8" else {n: (8, 8) if i in (0, len(layers) - 1) or i % 2 else (4, 8) for i, n in enumerate(layers)}
    qmodel = hessq.quantize(pretrained_resnet20, bits, calibration)
    imodel = hessq.to_integer(qmodel)
    with torch.no_grad():
        for x, _ in fashion_test:
            assert torch.equal(imodel(x), qmodel(x))
