import math

import pytest
import torch
from torch import nn

import hessq
from hessq.distill import DistilledData, distill_data, statistics_loss
from tests._models import TinyBN, bn_features


def _manual_loss(model: TinyBN, x: torch.Tensor) -> float:
    """The statistics loss written out by hand, matching each BN to its own input."""
    h1 = model.conv1(x)
    h2 = model.conv2(torch.relu(model.bn_early(h1)))
    total = 0.0
    for h, bn in ((h1, model.bn_early), (h2, model.bn_late)):
        mean = h.mean((0, 2, 3))
        std = torch.sqrt(h.var((0, 2, 3), unbiased=False) + bn.eps)
        total += float(((mean - bn.running_mean) ** 2).mean() + ((std - torch.sqrt(bn.running_var + bn.eps)) ** 2).mean())
    return total


def test_statistics_loss_matches_each_bn_to_its_own_input():
    model = TinyBN()
    x = torch.randn(8, 2, 6, 6)
    with torch.no_grad():
        assert statistics_loss(model, x) == pytest.approx(_manual_loss(model, x), rel=1e-5)


def test_distillation_drives_tiny_model_statistics_to_zero():
    model = TinyBN()
    d = distill_data(model, 16, (2, 6, 6), steps=300, lr=0.1, batch_size=16, progress=False)
    assert d.initial_loss > 0.5
    assert d.loss < d.initial_loss / 30, (d.initial_loss, d.loss)
    with torch.no_grad():
        assert _manual_loss(model, d.inputs) == pytest.approx(d.loss, rel=1e-3, abs=1e-6)


def test_distillation_on_resnet20_reduces_statistics_loss_by_a_large_factor(pretrained_resnet20):
    torch.set_num_threads(1)  # small convs: a thread pool only adds overhead on a busy machine
    d = distill_data(pretrained_resnet20, 32, (1, 28, 28), steps=60, batch_size=32, progress=False)
    assert d.inputs.shape == (32, 1, 28, 28)
    assert torch.isfinite(d.inputs).all()
    assert d.num_bn_layers == 21
    # Measured 30-48x (AVX512 and AVX2, seeds 0 and 1): a bound of 10x leaves room on any CPU.
    assert d.initial_loss > 10 * d.loss, (d.initial_loss, d.loss)
    # The reported loss is the loss of the returned inputs.
    assert statistics_loss(pretrained_resnet20, d.inputs) == pytest.approx(d.loss, rel=1e-3)


def test_seeded_and_batched():
    model = TinyBN()
    a = distill_data(model, 5, (2, 6, 6), steps=3, batch_size=2, seed=3, progress=False)
    b = distill_data(model, 5, (2, 6, 6), steps=3, batch_size=2, seed=3, progress=False)
    c = distill_data(model, 5, (2, 6, 6), steps=3, batch_size=2, seed=4, progress=False)
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.allclose(a.inputs, c.inputs)
    assert a.inputs.shape == (5, 2, 6, 6)
    assert len(a) == 3 and len(a.batch_losses) == 3
    assert [len(x) for x in a] == [2, 2, 1]
    assert [len(x) for x in a.batches(4)] == [4, 1]


def test_model_is_left_untouched():
    model = TinyBN()
    model.train()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distill_data(model, 4, (2, 6, 6), steps=5, batch_size=4, progress=False)
    assert model.training
    assert not model.fc.weight.requires_grad and model.conv1.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running stats too: BN ran in eval mode


def test_model_without_batchnorm_says_what_to_pass_instead():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="BatchNorm") as info:
        distill_data(mlp, 4, (1, 4, 4), steps=1, progress=False)
    msg = str(info.value)
    assert "real data" in msg and "Gaussian noise" in msg


def test_input_shape_that_does_not_fit():
    model = hessq.models.resnet20()
    with pytest.raises(ValueError, match=r"input_shape \(3, 28, 28\) does not fit ResNet") as info:
        distill_data(model, 4, (3, 28, 28), steps=1, progress=False)
    assert "without the batch dimension" in str(info.value)
    with pytest.raises(ValueError, match="input_shape"):
        distill_data(model, 4, (1, 0, 28), steps=1, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        distill_data(model, 0, (1, 28, 28), steps=1, progress=False)


def test_save_load_and_model_labels(tmp_path):
    model = TinyBN()
    d = distill_data(model, 6, (2, 6, 6), steps=2, batch_size=4, progress=False)
    d.save(tmp_path / "d.pt")
    e = DistilledData.load(tmp_path / "d.pt")
    assert torch.equal(e.inputs, d.inputs) and e.loss == d.loss and e.batch_size == 4 and e.steps == 2
    labelled = e.labelled(model)
    assert [len(x) for x, _ in labelled] == [4, 2]
    with torch.no_grad():
        assert torch.equal(torch.cat([y for _, y in labelled]), model(d.inputs).argmax(1))
    (tmp_path / "bad.pt").write_bytes(b"")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a hessq distilled-data set"):
        DistilledData.load(tmp_path / "other.pt")


def _act_scales(model, calibration) -> dict[str, float]:
    """The activation scales W8A8 calibration with min/max ranges sets: what the calibration data alone decides."""
    from hessq.quantizer import ActQuantizer

    qmodel = hessq.quantize(model, 8, calibration, percentile=100.0)
    return {name: float(m.scale) for name, m in qmodel.named_modules() if isinstance(m, ActQuantizer)}


def _mean_log_ratio(scales: dict[str, float], reference: dict[str, float]) -> float:
    return sum(abs(math.log(scales[k] / reference[k])) for k in reference) / len(reference)


@pytest.mark.slow
def test_resnet20_data_free_w8a8_within_half_a_point(pretrained_resnet20, fashion_test):
    """Data-free W8A8 within 0.5 points of FP32 on the whole test set, and distilled inputs closer to real ones than noise.

    Only properties of the method are asserted, each with room on any x86 CPU. The same seed distils different
    inputs on AVX2 and AVX512 (see hessq.distill._distill._deterministic_kernels), and a W4A4 accuracy with min/max
    ranges swings with the draw: over seeds 0-3 (64 inputs, 200 steps) distilled gave 76.1-86.4% and noise
    71.4-75.9%, a gap of 2.3 to 15 points (3.4 on one AMD EPYC), so no margin of one draw is asserted. Measured on
    AVX512 seeds 0-3 and AVX2 seeds 0-1: W8A8 within 0.08 points of FP32 (the bound is 0.5); statistics loss
    0.0026-0.012 against noise's 1.39 (the bound is 20x lower); mean |log| of the activation scales' ratio to real
    images' 0.14-0.18 for distilled inputs against 0.31-0.40 for noise (the bound: below noise's).
    """
    torch.set_num_threads(1)
    model = pretrained_resnet20
    d = distill_data(model, 64, (1, 28, 28), steps=200, batch_size=32, progress=False)
    noise = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    # ZeroQ's objective: the BatchNorm statistics of the distilled inputs match, noise's do not.
    noise_loss = statistics_loss(model, noise)
    assert d.loss < noise_loss / 20, (d.loss, noise_loss)

    # Hence the activation ranges they calibrate are closer to those of real images than noise's.
    real = next(iter(hessq.data.fashion_mnist("train", batch_size=64, limit=64)))[0]
    real_scales = _act_scales(model, [real])
    distilled_off = _mean_log_ratio(_act_scales(model, d), real_scales)
    noise_off = _mean_log_ratio(_act_scales(model, [noise]), real_scales)
    assert distilled_off < noise_off, (distilled_off, noise_off)

    # The claim: W8A8 calibrated on distilled inputs alone is within half a point of FP32.
    qmodel = hessq.quantize(model, (8, 8), d)
    # Float fake quantization: the integer model equals it bit for bit (tests/fakequant) and runs ~4x slower.
    qmodel.integer_eval = False
    fp32, distilled = hessq.accuracy(model, fashion_test), hessq.accuracy(qmodel, fashion_test)
    assert distilled >= fp32 - 0.005, (fp32, distilled)


def test_input_range_keeps_pixels_valid():
    model = TinyBN()
    d = distill_data(model, 4, (2, 6, 6), steps=20, lr=0.5, batch_size=4, progress=False, input_range=(-0.5, 0.5))
    assert d.inputs.min() >= -0.5 and d.inputs.max() <= 0.5
    assert d.meta["input_range"] == [-0.5, 0.5]
    with pytest.raises(ValueError, match="input_range"):
        distill_data(model, 4, (2, 6, 6), steps=1, progress=False, input_range=(1.0, 0.0))


def test_label_weight_pulls_each_input_to_its_own_random_class(pretrained_resnet20):
    torch.set_num_threads(1)
    model = pretrained_resnet20
    d = distill_data(model, 16, (1, 28, 28), steps=60, batch_size=16, progress=False, label_weight=1.0)
    targets = torch.tensor(d.meta["targets"])
    assert targets.shape == (16,) and d.meta["label_weight"] == 1.0
    assert len(set(targets.tolist())) >= 4  # drawn at random over the 10 classes, not one class
    with torch.no_grad():
        hits = int((model(d.inputs).argmax(1) == targets).sum())
    assert hits >= 12, hits  # 16 of 16 measured (seeds 0 and 1, AVX512 and AVX2): 3 of 4 leaves room
    # The BatchNorm statistics are still matched (the reported loss is the statistics term alone).
    assert d.initial_loss > 5 * d.loss, (d.initial_loss, d.loss)  # measured 15.6-17.3x
    assert statistics_loss(model, d.inputs) == pytest.approx(d.loss, rel=1e-3)
    plain = distill_data(model, 4, (1, 28, 28), steps=1, progress=False)
    assert "targets" not in plain.meta and plain.meta["label_weight"] == 0.0


def test_label_weight_needs_a_classifier_and_a_valid_weight():
    features = bn_features()
    with pytest.raises(ValueError, match=r"\(batch, classes\) logits.*label_weight=0"):
        distill_data(features, 4, (2, 6, 6), steps=1, progress=False, label_weight=1.0)
    distill_data(features, 4, (2, 6, 6), steps=1, progress=False)  # fine without the label term
    with pytest.raises(ValueError, match="label_weight must be"):
        distill_data(TinyBN(), 4, (2, 6, 6), steps=1, progress=False, label_weight=-1.0)
