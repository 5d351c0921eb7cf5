"""A detection set composed offline: Fashion-MNIST objects pasted onto crops of scikit-image photos.

No detection data set ships on this machine. Each canvas is a seeded random crop of one of the photos in
:mod:`hessq.data._photos`; onto it go one to ``max_objects`` Fashion-MNIST images, each resized to a side of
``min_size``–``max_size`` pixels (log-uniform, a little aspect jitter), tinted, and pasted through its own mask
(the pixels whose resized intensity is above a threshold). A box is the tight box of the pasted mask, in COCO
form ``[x, y, w, h]`` (pixel ``x`` to ``x + w - 1`` inclusive). Objects may overlap, but no object covers more
than half of another's box, so every object stays visible.

The splits come from disjoint Fashion-MNIST images: ``train`` from its training images 0–49,999, ``val``
from 50,000–59,999 and ``test`` from its test images, so no test object was seen in training.
Scoring is pycocotools' COCOeval (AP@[.5:.95], AP50) on results in COCO's result format.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hessq._errors import ConfigError, InputDataError, MissingDependencyError
from hessq.data._datasets import _FILES, _fashion_dir, _read_idx
from hessq.data._photos import photo_crops

#: Fashion-MNIST's class names; category id k + 1 is class k (COCO ids start at 1).
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
#: Canvases per split when ``num_images`` is not given (training takes ~15 min on 2 CPU cores at these sizes).
DEFAULT_DETECTION_SIZES = {"train": 6000, "val": 500, "test": 1000}
#: Fashion-MNIST image indices each split draws its objects from: (IDX file pair, first, end).
_SOURCES = {"train": ("train", 0, 50_000), "val": ("train", 50_000, 60_000), "test": ("test", 0, 10_000)}
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}
#: A resized object pixel belongs to the object when its intensity (0–1) is above this.
MASK_THRESHOLD = 0.15
#: Normalisation of the canvases for a model: (pixel / 255 − mean) / std.
DETECTION_MEAN, DETECTION_STD = 0.45, 0.25


@dataclass
class DetectionSet:
    """Canvases (uint8, (N, 3, S, S)) with their objects' boxes ([x, y, w, h], float), classes (0–9) and
    mask areas (pixels), one tensor per canvas."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    areas: list[torch.Tensor]
    split: str
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_objects(self) -> int:
        return sum(len(b) for b in self.boxes)

    def coco(self) -> dict[str, Any]:
        """The ground truth as a COCO JSON dictionary (``images``, ``annotations``, ``categories``); image id
        ``i + 1`` is canvas ``i``."""
        size = int(self.images.shape[-1])
        images = [{"id": i + 1, "file_name": f"{self.split}_{i:06d}.png", "width": size, "height": size}
                  for i in range(len(self))]
        annotations = []
        for i, (boxes, labels, areas) in enumerate(zip(self.boxes, self.labels, self.areas)):
            for box, label, area in zip(boxes.tolist(), labels.tolist(), areas.tolist()):
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                    "bbox": [float(v) for v in box], "area": float(area), "iscrowd": 0})
        categories = [{"id": k + 1, "name": name, "supercategory": "fashion"} for k, name in enumerate(FASHION_MNIST_CLASSES)]
        info = {k: v for k, v in self.meta.items() if k != "masks"}
        return {"info": {"description": f"hessq Fashion-MNIST detection set, split {self.split}, seed {self.seed}", **info},
                "images": images, "annotations": annotations, "categories": categories}

    def normalized(self, index: slice | torch.Tensor | Sequence[int] = slice(None)) -> torch.Tensor:
        """Canvases as float model inputs, (pixel / 255 − 0.45) / 0.25."""
        return normalize_canvases(self.images[index])


def normalize_canvases(images: torch.Tensor) -> torch.Tensor:
    """uint8 canvases to float model inputs: (pixel / 255 − 0.45) / 0.25."""
    return (images.float() / 255.0 - DETECTION_MEAN) / DETECTION_STD


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _fashion_objects(split: str, root: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
    """The split's Fashion-MNIST source images (uint8, (N, 28, 28)) and labels."""
    which, start, end = _SOURCES[split]
    images, labels = _read_fashion(_fashion_dir(root), which)
    return images[start:end], labels[start:end]


@functools.lru_cache(maxsize=2)
def _read_fashion(d: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    """One Fashion-MNIST IDX pair, read once per process (decompressing 60,000 images takes a second)."""
    names = _FILES[which]
    missing = [n for n in names if not (d / n).exists()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files {missing} not found in {d}: the detection set pastes its objects. "
                                "Install them with `sudo apt-get install dataset-fashion-mnist`, or pass root= "
                                "(or set HESSQ_FASHION_MNIST_DIR) to a folder holding the IDX .gz files.")
    return _read_idx(d / names[0]), _read_idx(d / names[1])


def _covers_too_much(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]], limit: float) -> bool:
    """Whether ``box`` (x0, y0, x1, y1 exclusive) and one of ``others`` overlap by more than ``limit`` of the
    smaller one's area."""
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        if iw > 0 and ih > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (o[2] - o[0]) * (o[3] - o[1]))
            if iw * ih > limit * smaller:
                return True
    return False


def detection_set(
    split: str = "train",
    num_images: int | None = None,
    *,
    seed: int = 0,
    size: int = 128,
    min_size: int = 14,
    max_size: int = 80,
    max_objects: int = 4,
    max_overlap: float = 0.5,
    root: str | os.PathLike | None = None,
    keep_masks: bool = False,
) -> DetectionSet:
    """Compose a detection split, deterministically from ``seed`` (the same seed and arguments give the same
    canvases and boxes, bit for bit, on one machine).

    ``num_images`` defaults to :data:`DEFAULT_DETECTION_SIZES` (train 6,000, val 500, test 1,000).
    Each canvas holds 1 to ``max_objects`` objects of ``min_size``–``max_size`` pixels (the side the 28×28
    image is resized to); an object overlapping another by more than ``max_overlap`` of the smaller box is
    placed elsewhere (20 tries), else left out.
    """
    if split not in _SOURCES:
        raise ConfigError(f"split must be 'train', 'val' or 'test', got {split!r}")
    num_images = DEFAULT_DETECTION_SIZES[split] if num_images is None else _check_int(num_images, "num_images", 1)
    seed = _check_int(seed, "seed", 0)
    size = _check_int(size, "size", 16)
    min_size = _check_int(min_size, "min_size", 4)
    max_size = _check_int(max_size, "max_size", min_size)
    max_objects = _check_int(max_objects, "max_objects", 1)
    if max_size > size:
        raise ConfigError(f"max_size ({max_size}) must not exceed the canvas size ({size})")
    if isinstance(max_overlap, bool) or not isinstance(max_overlap, (int, float)) or not 0 <= max_overlap <= 1:
        raise ConfigError(f"max_overlap must be a number in [0, 1], got {max_overlap!r}")
    sources, source_labels = _fashion_objects(split, root)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    canvases = photo_crops(num_images, size=size, seed=seed * 3 + _SPLIT_STREAM[split], scale=(0.05, 0.6))
    order = rng.permutation(len(sources))
    next_source = 0
    all_boxes, all_labels, all_areas, all_masks = [], [], [], []
    for i in range(num_images):
        canvas = canvases[i]
        placed: list[tuple[int, int, int, int]] = []
        boxes, labels, areas, masks = [], [], [], []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            k = int(order[next_source % len(order)])
            next_source += 1
            side = float(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
            aspect = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
            h = int(np.clip(round(side * np.sqrt(aspect)), min_size, max_size))
            w = int(np.clip(round(side / np.sqrt(aspect)), min_size, max_size))
            tint = rng.uniform(0.35, 1.0, size=3)
            tries = [(int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))) for _ in range(20)]
            src = torch.from_numpy(sources[k].astype(np.float32) / 255.0)[None, None]
            # intensity rounded to 1/255 so the mask threshold does not hinge on a float's last bits
            intensity = (F.interpolate(src, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]
                         .clamp(0, 1) * 255).round() / 255
            mask = intensity > MASK_THRESHOLD
            if not bool(mask.any()):
                continue
            rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
            r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            for top, left in tries:
                box = (left + c0, top + r0, left + c1, top + r1)
                if not _covers_too_much(box, placed, max_overlap):
                    break
            else:
                continue
            colour = torch.from_numpy(tint.astype(np.float32))[:, None, None] * (0.35 + 0.65 * intensity)[None] * 255
            region = canvas[:, top : top + h, left : left + w]
            region[:, mask] = colour.round().clamp(0, 255).to(torch.uint8)[:, mask]
            placed.append(box)
            boxes.append([box[0], box[1], box[2] - box[0], box[3] - box[1]])
            labels.append(int(source_labels[k]))
            areas.append(int(mask.sum()))
            if keep_masks:
                masks.append(F.pad(mask, (left, size - left - w, top, size - top - h)))
        all_boxes.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        all_labels.append(torch.tensor(labels, dtype=torch.int64))
        all_areas.append(torch.tensor(areas, dtype=torch.int64))
        if keep_masks:
            all_masks.append(torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool))
    meta = {"size": size, "min_size": min_size, "max_size": max_size, "max_objects": max_objects, "max_overlap": max_overlap}
    result = DetectionSet(canvases, all_boxes, all_labels, all_areas, split, seed, meta)
    if keep_masks:
        result.meta["masks"] = all_masks
    return result


# ----------------------------------------------------------------------------- CenterNet targets
def _gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the largest corner shift keeping IoU ≥ ``min_overlap`` with the true box
    (the smallest root of the three quadratic cases in Law & Deng's CornerNet)."""
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + np.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + np.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + np.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return float(min(r1, r2, r3))


def encode_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], *, num_classes: int = 10,
                   input_size: int = 128, stride: int = 4) -> torch.Tensor:
    """Dense CenterNet targets, one tensor (N, num_classes + 5, H/stride, W/stride): the class heatmaps (a
    Gaussian at each object's centre cell, peak 1), then at each centre cell the size (w, h) in output cells,
    the sub-cell offset of the centre (x, y) and a 1 in the last channel (the regression mask)."""
    out_size = input_size // stride
    targets = torch.zeros(len(boxes), num_classes + 5, out_size, out_size)
    grid = torch.arange(out_size, dtype=torch.float32)
    for n, (bxs, lbls) in enumerate(zip(boxes, labels)):
        for (x, y, w, h), c in zip(bxs.tolist(), lbls.tolist()):
            cx, cy = (x + w / 2) / stride, (y + h / 2) / stride
            px, py = min(int(cx), out_size - 1), min(int(cy), out_size - 1)
            radius = max(0, int(_gaussian_radius(h / stride, w / stride)))
            sigma = (2 * radius + 1) / 6
            g = torch.exp(-((grid[None, :] - px) ** 2 + (grid[:, None] - py) ** 2) / (2 * sigma * sigma))
            g = torch.where(((grid[None, :] - px).abs() <= radius) & ((grid[:, None] - py).abs() <= radius), g, 0.0)
            torch.maximum(targets[n, c], g, out=targets[n, c])
            targets[n, num_classes:, py, px] = torch.tensor([w / stride, h / stride, cx - px, cy - py, 1.0])
    return targets


def _flip_boxes(boxes: torch.Tensor, size: int) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0] = size - boxes[:, 0] - boxes[:, 2]
    return out


class DetectionBatches:
    """Re-iterable ``(inputs, targets)`` batches of a :class:`DetectionSet`: normalised float canvases and the
    dense targets of :func:`encode_targets`, built per batch. With ``shuffle`` each pass draws a new order
    from ``seed`` and the pass number (as :class:`hessq.data.TensorBatches`); with ``flip`` half the canvases
    of a batch are mirrored left–right, boxes with them."""

    def __init__(self, data: DetectionSet, batch_size: int = 32, *, shuffle: bool = False, flip: bool = False,
                 seed: int = 0, stride: int = 4, limit: int | None = None) -> None:
        if not isinstance(data, DetectionSet):
            raise InputDataError(f"data must be a DetectionSet (hessq.data.detection_set), got {type(data).__name__}")
        self.data = data
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.shuffle, self.flip, self.seed, self.stride = shuffle, flip, seed, stride
        self.count = len(data) if limit is None else min(len(data), _check_int(limit, "limit", 1))
        self._epoch = 0

    def __len__(self) -> int:
        return (self.count + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self._epoch)
        if self.shuffle:
            order = torch.randperm(self.count, generator=gen)
            self._epoch += 1
        else:
            order = torch.arange(self.count)
        size = int(self.data.images.shape[-1])
        for start in range(0, self.count, self.batch_size):
            idx = order[start : start + self.batch_size].tolist()
            images = self.data.images[idx]
            boxes = [self.data.boxes[i] for i in idx]
            if self.flip:
                mirrored = (torch.rand(len(idx), generator=gen) < 0.5).tolist()
                images = torch.stack([im.flip(-1) if m else im for im, m in zip(images, mirrored)])
                boxes = [_flip_boxes(b, size) if m else b for b, m in zip(boxes, mirrored)]
            targets = encode_targets(boxes, [self.data.labels[i] for i in idx], input_size=size, stride=self.stride)
            yield normalize_canvases(images), targets


# ----------------------------------------------------------------------------- scoring
def coco_evaluate(ground_truth: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, float]:
    """pycocotools' COCOeval (bounding boxes) of ``results`` (COCO result format: ``image_id``,
    ``category_id``, ``bbox`` [x, y, w, h], ``score``) against ``ground_truth`` (a COCO dictionary), its
    prints silenced. Returns AP (@[.5:.95]), AP50, AP75, AP_small/medium/large and AR100; no results scores 0."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise MissingDependencyError("scoring detections needs pycocotools: pip install pycocotools  "
                                     "(or pip install 'hessq[detection]')") from None
    names = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")
    if not results:
        return {n: 0.0 for n in names}
    known = {im["id"] for im in ground_truth["images"]}
    stray = sorted({r["image_id"] for r in results} - known)
    if stray:
        raise InputDataError(f"results name image ids {stray[:5]} that the ground truth does not have; "
                             "image id i + 1 is canvas i of the set")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds fields to the dictionaries it is given
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(max(v, 0.0)) for v in ev.stats]  # COCOeval writes -1 where a category has no object
    return dict(zip(names, stats))
