"""CoDeNet: a small CenterNet-style detector with a deformable decoder, on hessq's Fashion-MNIST detection set.

The network (input 3×128×128, output stride 4):

- a ShuffleNetV2-like backbone: a 3×3 stride-2 stem and a max-pool (stride 4), then three stages of
  channel-split / channel-shuffle units (strides 8, 16, 32);
- a decoder of three stages, each ``deform_block(variant)`` → BatchNorm → ReLU → nearest 2× upsampling, the
  upsampled map added to a 1×1 lateral projection of the backbone feature of the same stride, then ReLU
  (the lateral adds keep the boxes' localisation with a short training schedule);
- the heads: a shared depthwise-separable 3×3 conv + ReLU, then one 1×1 conv whose 14 output channels are the three heads
  concatenated: 10 centre-heatmap logits, the box size (w, h) in output cells, the centre's sub-cell offset.

The forward returns that one tensor, so hessq's single-output integer program carries it; decoding (sigmoid,
3×3 max-pool peaks, top-k, boxes) is :func:`decode_detections`, plain PyTorch outside the model. The loss is
CenterNet's: the penalty-reduced focal loss on the heatmap plus L1 on size and offset at the centres.

Nearest 2× upsampling is written as a concatenation, a reshape and a permutation (:class:`NearestUpsample2x`),
ops hessq's registry has; ``F.interpolate`` has no op family yet.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ArtifactError, ConfigError, ConfigTypeError
from hessq._io import default_cache_dir, write_atomic
from hessq._utils import model_device, training_mode
from hessq.data._detection import (DetectionBatches, DetectionSet, coco_evaluate, detection_set)
from hessq.nn import VARIANTS, deform_block

NUM_CLASSES = 10
STRIDE = 4
#: Output channels: heatmap logits, then size (w, h) in cells, then offset (x, y).
HEAD_CHANNELS = NUM_CLASSES + 4
#: The checkpoint format name written into every saved file's metadata.
CHECKPOINT_FORMAT = "hessq-codenet"
#: The training recipe; a checkpoint records it, and a cached one trained with another is not used.
DEFAULT_RECIPE: dict[str, Any] = {"train_images": 4000, "epochs": 5, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4,
                                  "warmup_steps": 100, "seed": 0, "data_seed": 0, "flip": True}
#: The variant :func:`codenet_task` trains by default: only rounded offsets have an integer path.
DEFAULT_VARIANT = "square_rounded"


# ----------------------------------------------------------------------------- network
def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """ShuffleNet's channel shuffle: channel g·(C/groups) + i moves to i·groups + g."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: stride 1 splits the channels and transforms one half; stride 2 transforms both copies
    (one a depthwise 3×3 stride-2 then 1×1); the halves are concatenated and shuffled."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2) or cout % 2 or (stride == 1 and cin != cout):
            raise ConfigError(f"a ShuffleNetV2 unit needs stride 1 or 2, an even cout, and cin == cout at stride 1; "
                              f"got cin={cin}, cout={cout}, stride={stride}")
        self.stride = stride
        half = cout // 2
        branch_in = cin if stride == 2 else half
        self.branch = nn.Sequential(_conv_bn(branch_in, half), _conv_bn(half, half, 3, stride, groups=half, relu=False),
                                    _conv_bn(half, half))
        self.shortcut = (nn.Sequential(_conv_bn(cin, cin, 3, 2, groups=cin, relu=False), _conv_bn(cin, half))
                         if stride == 2 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            kept, moved = x.chunk(2, dim=1)
            out = torch.cat([kept, self.branch(moved)], 1)
        else:
            out = torch.cat([self.shortcut(x), self.branch(x)], 1)
        return channel_shuffle(out)


class NearestUpsample2x(nn.Module):
    """Nearest-neighbour 2× upsampling from ops hessq quantizes exactly: four copies concatenated along the
    channels, then a reshape and a permutation that interleave them (copy 2a + b lands at row 2y + a,
    column 2x + b). Equal to ``F.interpolate(x, scale_factor=2, mode="nearest")``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        copies = torch.cat([x, x, x, x], 1).reshape(n, 2, 2, c, h, w)
        return copies.permute(0, 3, 4, 1, 5, 2).reshape(n, c, 2 * h, 2 * w)


class DecoderStage(nn.Module):
    """deform_block(variant) → BN → ReLU → nearest 2× → + lateral 1×1 projection of the skip → ReLU."""

    def __init__(self, variant: str, cin: int, cout: int, skip_channels: int) -> None:
        super().__init__()
        self.block = deform_block(variant, cin, cout)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.up = NearestUpsample2x()
        self.lateral = _conv_bn(skip_channels, cout, relu=False)
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = self.up(self.relu(self.bn(self.block(x))))
        return self.relu_out(y + self.lateral(skip))


class CoDeNet(nn.Module):
    """The detector (see the module doc). ``forward`` returns [N, 14, H/4, W/4]: heatmap logits, size, offset."""

    def __init__(self, variant: str = DEFAULT_VARIANT, *, width: int = 1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"unknown CoDeNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"width must be an integer >= 1 (a channel multiplier), got {width!r}")
        self.variant, self.num_classes = variant, num_classes
        c = [16 * width, 48 * width, 96 * width, 192 * width]
        d = [64 * width, 48 * width, 32 * width]
        self.stem = _conv_bn(3, c[0], 3, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleUnit(c[0], c[1], 2), ShuffleUnit(c[1], c[1], 1))
        self.stage3 = nn.Sequential(ShuffleUnit(c[1], c[2], 2), ShuffleUnit(c[2], c[2], 1), ShuffleUnit(c[2], c[2], 1))
        self.stage4 = nn.Sequential(ShuffleUnit(c[2], c[3], 2), ShuffleUnit(c[3], c[3], 1))
        self.up1 = DecoderStage(variant, c[3], d[0], c[2])
        self.up2 = DecoderStage(variant, d[0], d[1], c[1])
        self.up3 = DecoderStage(variant, d[1], d[2], c[0])
        self.head = nn.Sequential(nn.Conv2d(d[2], d[2], 3, 1, 1, groups=d[2]), nn.Conv2d(d[2], 2 * d[2], 1), nn.ReLU(),
                                  nn.Conv2d(2 * d[2], num_classes + 4, 1))
        with torch.no_grad():  # CenterNet's prior: every heatmap starts at sigmoid(−2.19) ≈ 0.1
            self.head[3].bias[:num_classes].fill_(-2.19)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s4 = self.pool(self.stem(x))
        s8 = self.stage2(s4)
        s16 = self.stage3(s8)
        s32 = self.stage4(s16)
        y = self.up1(s32, s16)
        y = self.up2(y, s8)
        y = self.up3(y, s4)
        return self.head(y)


def codenet(variant: str = DEFAULT_VARIANT, *, pretrained: bool = False, cache_dir: str | os.PathLike | None = None,
            progress: bool = True, width: int = 1) -> CoDeNet:
    """The CoDeNet detector with ``variant``'s decoder blocks (``"conv"``, ``"full"``, ``"depthwise"``,
    ``"bounded"``, ``"square"``, ``"square_rounded"``). With ``pretrained`` the weights trained on hessq's
    detection set (:func:`trained_codenet`: bundled, cached, or trained now into ``cache_dir``)."""
    if pretrained:
        if width != 1:
            raise ConfigError("pretrained weights exist for width=1 only")
        return trained_codenet(variant, cache_dir=cache_dir, progress=progress)
    return CoDeNet(variant, width=width)


# ----------------------------------------------------------------------------- loss and decoding
def centernet_loss(output: torch.Tensor, targets: torch.Tensor, *, size_weight: float = 0.1,
                   offset_weight: float = 1.0) -> torch.Tensor:
    """CenterNet's loss of ``output`` [N, C + 4, H, W] against ``targets`` [N, C + 5, H, W] (see
    :func:`hessq.data.encode_targets`): the penalty-reduced focal loss (α = 2, β = 4) on the heatmap plus
    L1 on the size and offset at the centre cells, each summed and divided by the number of objects."""
    if output.dim() != 4 or targets.dim() != 4 or targets.shape[1] != output.shape[1] + 1 or \
            output.shape[0] != targets.shape[0] or output.shape[2:] != targets.shape[2:]:
        raise ConfigError(f"CenterNet loss: output [N, C+4, H, W] and targets [N, C+5, H, W] expected, got "
                          f"{list(output.shape)} and {list(targets.shape)}")
    c = output.shape[1] - 4
    logits, heat = output[:, :c], targets[:, :c]
    mask = targets[:, c + 4 : c + 5]
    num = mask.sum().clamp(min=1.0)
    positive = heat.eq(1).to(output.dtype)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    focal = positive * (1 - p) ** 2 * log_p + (1 - positive) * (1 - heat) ** 4 * p**2 * log_not_p
    size = (output[:, c : c + 2] - targets[:, c : c + 2]).abs() * mask
    offset = (output[:, c + 2 : c + 4] - targets[:, c + 2 : c + 4]).abs() * mask
    return (-focal.sum() + size_weight * size.sum() + offset_weight * offset.sum()) / num


@dataclass
class Detections:
    """One image's detections: boxes [K, 4] as [x, y, w, h] in input pixels, scores [K], classes [K] (0–9)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


def decode_detections(output: torch.Tensor, *, top_k: int = 50, stride: int = STRIDE,
                      min_score: float = 0.0) -> list[Detections]:
    """CenterNet's NMS-free decoding of ``output`` [N, C + 4, H, W]: sigmoid heatmaps, peaks that equal their
    3×3 max-pool, the ``top_k`` best over all classes, boxes from size and offset at the peak."""
    output = output.detach().float()
    n, ch, h, w = output.shape
    c = ch - 4
    heat = torch.sigmoid(output[:, :c])
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    k = min(top_k, c * h * w)
    scores, index = peaks.reshape(n, -1).topk(k)
    labels, cell = index // (h * w), index % (h * w)
    ys, xs = cell // w, cell % w
    regress = output[:, c:].reshape(n, 4, h * w)
    picked = torch.gather(regress, 2, cell[:, None, :].expand(n, 4, k))  # [N, 4, K]: w, h, dx, dy
    bw, bh = picked[:, 0].clamp(min=0) * stride, picked[:, 1].clamp(min=0) * stride
    cx, cy = (xs + picked[:, 2]) * stride, (ys + picked[:, 3]) * stride
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, bw, bh], -1)
    out = []
    for i in range(n):
        keep = scores[i] > min_score
        out.append(Detections(boxes[i][keep], scores[i][keep], labels[i][keep]))
    return out


def coco_results(detections: Iterable[Detections], first_image_id: int = 1) -> list[dict[str, Any]]:
    """Detections in COCO's result format; image ``first_image_id + i`` is the i-th."""
    results = []
    for i, det in enumerate(detections):
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            results.append({"image_id": first_image_id + i, "category_id": int(label) + 1,
                            "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)})
    return results


@torch.no_grad()
def evaluate_detector(model: Callable[[torch.Tensor], torch.Tensor], data: DetectionSet, *, batch_size: int = 50,
                      top_k: int = 50) -> dict[str, float]:
    """pycocotools AP, AP50 (and the rest of COCOeval's summary) of ``model`` (an ``nn.Module`` in eval mode on
    its own device, or any callable such as an integer model) on every canvas of ``data``."""
    device = model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    detections: list[Detections] = []
    with training_mode(model, False):
        for start in range(0, len(data), batch_size):
            x = data.normalized(slice(start, start + batch_size)).to(device)
            detections += decode_detections(model(x).cpu(), top_k=top_k)
    return coco_evaluate(data.coco(), coco_results(detections))


# ----------------------------------------------------------------------------- training and checkpoints
def _recipe_key(variant: str, recipe: dict[str, Any]) -> str:
    return json.dumps({"variant": variant, **recipe}, sort_keys=True)


def train_codenet(variant: str = DEFAULT_VARIANT, *, recipe: dict[str, Any] | None = None,
                  train_set: DetectionSet | None = None, init: nn.Module | None = None, progress: bool = True) -> CoDeNet:
    """Train a CoDeNet with ``recipe`` (defaults :data:`DEFAULT_RECIPE`): AdamW, linear warm-up then cosine decay
    per step, horizontal flips. From scratch, or from ``init`` (a trained CoDeNet of any variant): every tensor of
    the same name and shape is copied (backbone, heads, the decoder's shared parts), the rest is drawn fresh.
    Deterministic for a seed on one machine and thread count."""
    recipe = {**DEFAULT_RECIPE, **(recipe or {})}
    unknown = set(recipe) - set(DEFAULT_RECIPE)
    if unknown:
        raise ConfigError(f"unknown CoDeNet recipe keys {sorted(unknown)}; known: {sorted(DEFAULT_RECIPE)}")
    if train_set is None:
        train_set = detection_set("train", recipe["train_images"], seed=recipe["data_seed"])
    torch.manual_seed(recipe["seed"])
    model = CoDeNet(variant)
    if init is not None:
        if not isinstance(init, nn.Module):
            raise ConfigTypeError(f"init must be a trained CoDeNet (an nn.Module), got {type(init).__name__}")
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in init.state_dict().items() if k in own and own[k].shape == v.shape},
                              strict=False)
    batches = DetectionBatches(train_set, recipe["batch_size"], shuffle=True, flip=recipe["flip"], seed=recipe["seed"])
    total = recipe["epochs"] * len(batches)
    warmup = min(recipe["warmup_steps"], total // 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    model.train()
    start, step = time.time(), 0
    for epoch in range(recipe["epochs"]):
        batches.set_epoch(epoch)
        running = 0.0
        for x, y in batches:
            loss = centernet_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
            step += 1
            if progress and step % 25 == 0:
                print(f"codenet[{variant}] step {step}/{total}: loss {float(loss.detach()):.4f} ({time.time() - start:.0f} s)",
                      flush=True)
        if progress:
            print(f"codenet[{variant}] epoch {epoch + 1}/{recipe['epochs']}: loss {running / len(batches):.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    model.eval()
    model.recipe = recipe  # type: ignore[attr-defined]
    return model


def save_codenet(model: CoDeNet, path: str | os.PathLike, recipe: dict[str, Any]) -> None:
    """The weights as safetensors (written to a temporary name, then renamed), with metadata naming the format,
    variant, recipe and hessq version."""
    from safetensors.torch import save_file

    import hessq

    recipe = {**DEFAULT_RECIPE, **recipe}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": CHECKPOINT_FORMAT, "variant": model.variant, "recipe": _recipe_key(model.variant, recipe),
            "hessq_version": hessq.__version__}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_codenet(path: str | os.PathLike, variant: str, recipe: dict[str, Any] | None = None) -> CoDeNet:
    """A CoDeNet from a safetensors file of :func:`save_codenet`; a damaged file, or one for another variant or
    recipe, is refused with an :class:`hessq.ArtifactError` saying so (no pickle is ever read)."""
    from safetensors import safe_open

    recipe = {**DEFAULT_RECIPE, **(recipe or {})}
    remedy = f"delete {path} and it is trained again on next use"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header or body
        raise ArtifactError(f"{path} is not a readable CoDeNet checkpoint ({type(exc).__name__}: {exc}); {remedy}") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("variant") != variant:
        raise ArtifactError(f"{path} is not a CoDeNet {variant!r} checkpoint (format {meta.get('format')!r}, variant "
                            f"{meta.get('variant')!r}); {remedy}")
    if meta.get("recipe") != _recipe_key(variant, recipe):
        raise ArtifactError(f"{path} was trained with another recipe ({meta.get('recipe')}); {remedy}")
    model = CoDeNet(variant)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ArtifactError(f"{path} does not fit the CoDeNet {variant!r} network: {str(exc).splitlines()[0]}; {remedy}") from None
    model.eval()
    model.recipe = recipe  # type: ignore[attr-defined]
    return model


def checkpoint_name(variant: str, recipe: dict[str, Any] | None = None) -> str:
    """The file name of a variant's checkpoint: the default recipe's is ``codenet_<variant>.safetensors``."""
    recipe = {**DEFAULT_RECIPE, **(recipe or {})}
    if recipe == DEFAULT_RECIPE:
        return f"codenet_{variant}.safetensors"
    import hashlib

    return f"codenet_{variant}_{hashlib.sha256(_recipe_key(variant, recipe).encode()).hexdigest()[:12]}.safetensors"


def trained_codenet(variant: str = DEFAULT_VARIANT, *, recipe: dict[str, Any] | None = None,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> CoDeNet:
    """The trained detector: the checkpoint bundled with hessq when there is one for this variant and recipe, else
    the one in the cache folder (``cache_dir``, ``$HESSQ_CACHE_DIR``, ``~/.cache/hessq``), else trained now
    (about 2 minutes on 2 idle CPU cores for the default recipe) and saved there."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown CoDeNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    name = checkpoint_name(variant, recipe)
    bundled = resources.files("hessq.models").joinpath(name)
    if bundled.is_file():
        with resources.as_file(bundled) as path:
            return load_codenet(path, variant, recipe)
    path = default_cache_dir(cache_dir) / name
    if path.exists():
        return load_codenet(path, variant, recipe)
    if progress:
        print(f"codenet: no {name} in {path.parent}; training it now (a few minutes on 2 CPU cores)", flush=True)
    model = train_codenet(variant, recipe=recipe, progress=progress)
    save_codenet(model, path, model.recipe)  # type: ignore[attr-defined]
    return model


# ----------------------------------------------------------------------------- the task for the pipeline
@dataclass
class CodeNetTask:
    """Everything ``hessq compress --model codenet`` needs: the trained float model, batches of
    ``(inputs, targets)`` (targets: dense CenterNet tensors), the detection loss and a pycocotools scorer."""

    model: CoDeNet
    train_batches: DetectionBatches
    calibration_batches: list[tuple[torch.Tensor, torch.Tensor]]
    test_batches: DetectionBatches
    test_set: DetectionSet
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = centernet_loss
    metrics: tuple[str, ...] = ("AP", "AP50")
    info: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, model: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """AP (@[.5:.95]) and AP50 of ``model`` (float, fake-quant or integer) on the test split, in percent."""
        scores = evaluate_detector(model, self.test_set)
        return {"AP": 100 * scores["AP"], "AP50": 100 * scores["AP50"]}


def codenet_task(cache_dir: str | os.PathLike | None = None, progress: bool = True, *, variant: str = DEFAULT_VARIANT,
                 test_images: int | None = None, calibration_batches: int = 4) -> CodeNetTask:
    """The trained CoDeNet (:func:`trained_codenet`) with its data: the training split in shuffled, flipped
    batches of 32, ``calibration_batches`` batches of 32 from the validation split, and the test split
    (``test_images``, default 1,000)."""
    model = trained_codenet(variant, cache_dir=cache_dir, progress=progress)
    recipe = model.recipe  # type: ignore[attr-defined]
    train = detection_set("train", recipe["train_images"], seed=recipe["data_seed"])
    val = detection_set("val", seed=recipe["data_seed"])
    test = detection_set("test", test_images, seed=recipe["data_seed"])
    return CodeNetTask(
        model=model,
        train_batches=DetectionBatches(train, recipe["batch_size"], shuffle=True, flip=True, seed=recipe["seed"] + 1),
        calibration_batches=list(DetectionBatches(val, 32, limit=32 * calibration_batches)),
        test_batches=DetectionBatches(test, 50),
        test_set=test,
        info={"variant": variant, "recipe": recipe, "train_images": len(train), "test_images": len(test)},
    )
