import pytest
import torch
import torch.nn.functional as F

from hessq._errors import ArtifactError, ConfigError
from hessq.data import DetectionBatches, detection_set, encode_targets
from hessq.models import CoDeNet, centernet_loss, decode_detections
from hessq.models._codenet import NearestUpsample2x, channel_shuffle, load_codenet, save_codenet
from hessq.nn import VARIANTS


@pytest.fixture(scope="module")
def tiny_set():
    return detection_set("val", 8, seed=7)


def test_forward_shape_for_every_variant():
    x = torch.randn(2, 3, 128, 128)
    for variant in VARIANTS:
        model = CoDeNet(variant).eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 14, 32, 32), variant
        assert torch.isfinite(out).all()


def test_upsampling_and_shuffle_are_the_reference_ops():
    x = torch.randn(2, 6, 3, 5)
    assert torch.equal(NearestUpsample2x()(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    shuffled = channel_shuffle(x)
    assert torch.equal(shuffled[:, 0::2], x[:, :3]) and torch.equal(shuffled[:, 1::2], x[:, 3:])


def test_decoding_the_encoded_ground_truth_gives_the_boxes_back(tiny_set):
    targets = encode_targets(tiny_set.boxes, tiny_set.labels)
    heat = targets[:, :10].clamp(1e-4, 1 - 1e-4)
    output = torch.cat([torch.log(heat / (1 - heat)), targets[:, 10:14]], 1)  # a model that predicts the targets
    decoded = decode_detections(output, min_score=0.5)
    checked = 0
    for det, boxes, labels in zip(decoded, tiny_set.boxes, tiny_set.labels):
        centres = {(int((x + w / 2) / 4), int((y + h / 2) / 4)) for x, y, w, h in boxes.tolist()}
        if len(centres) < len(boxes):
            continue  # two objects in one output cell: CenterNet keeps one
        order, expected = det.boxes[:, 0].argsort(), boxes[:, 0].argsort()
        assert len(det.boxes) == len(boxes)
        torch.testing.assert_close(det.boxes[order], boxes[expected], rtol=0, atol=1e-4)
        assert torch.equal(det.labels[order], labels[expected])
        checked += 1
    assert checked >= 6


def test_loss_is_finite_and_decreases(tiny_set):
    torch.manual_seed(0)
    model = CoDeNet("conv").train()
    x, y = next(iter(DetectionBatches(tiny_set, 8)))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss = centernet_loss(model(x), y)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    with pytest.raises(ConfigError, match="targets"):
        centernet_loss(model(x), y[:, :14])


def test_loss_weighs_its_parts_as_centernet(tiny_set):
    targets = encode_targets(tiny_set.boxes, tiny_set.labels)
    heat = targets[:, :10].clamp(1e-6, 1 - 1e-6)
    exact = torch.cat([torch.log(heat / (1 - heat)), targets[:, 10:14]], 1)
    base = centernet_loss(exact, targets)

    def changed(channels: slice, delta: float) -> float:
        out = exact.clone()
        out[:, channels] += delta
        return float(centernet_loss(out, targets) - base)

    # per object: a size one cell off in w and h costs 0.1·2, an offset a quarter cell off in x and y costs 1·0.5
    assert changed(slice(10, 12), 1.0) == pytest.approx(0.2, abs=1e-4)
    assert changed(slice(12, 14), -0.25) == pytest.approx(0.5, abs=1e-4)
    assert changed(slice(0, 10), 1.0) > 0.1  # over-confident everywhere: the negatives' focal term grows


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = CoDeNet("square_rounded").eval()
    path = tmp_path / "codenet_square_rounded.safetensors"
    save_codenet(model, path, {})
    loaded = load_codenet(path, "square_rounded")
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(ArtifactError, match="not a CoDeNet 'conv' checkpoint"):
        load_codenet(path, "conv")
    with pytest.raises(ArtifactError, match="another recipe"):
        load_codenet(path, "square_rounded", {"epochs": 1})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ArtifactError, match="not a readable CoDeNet checkpoint"):
        load_codenet(path, "square_rounded")
    with pytest.raises(ConfigError, match="unknown CoDeNet variant"):
        CoDeNet("dense")


def test_training_from_another_variant_copies_every_tensor_of_the_same_shape(tiny_set):
    from hessq.models._codenet import train_codenet

    torch.manual_seed(5)
    source = CoDeNet("full")
    # lr 0: the copied tensors come out as they went in (AdamW's decay is scaled by lr too)
    model = train_codenet("square_rounded", recipe={"train_images": len(tiny_set), "epochs": 1, "lr": 0.0},
                          train_set=tiny_set, init=source, progress=False)
    src, own = source.state_dict(), model.state_dict()
    same = [k for k in own if k in src and src[k].shape == own[k].shape]
    assert any(k.startswith("stem") for k in same) and len(same) < len(own)  # the backbone, not the offset branches
    for k in same:
        if own[k].is_floating_point() and "running" not in k:
            assert torch.equal(own[k], src[k]), k
    fresh = [k for k in own if k not in same]
    assert fresh and all("up" in k for k in fresh)  # only decoder blocks differ between variants
    with pytest.raises(ConfigError, match="init must be a trained CoDeNet"):
        train_codenet("square", train_set=tiny_set, init=source.state_dict(), progress=False)
