"""Readers for the offline datasets. Nothing here downloads."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hessq._errors import ConfigError, InputDataError

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class TensorBatches:
    """A re-iterable sequence of (inputs, targets) batches over in-memory tensors.

    Iterating twice gives the same batches unless ``shuffle`` is set, in which
    case each pass draws a new order from ``seed`` and the pass number, so runs
    are reproducible.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        augment=None,
    ) -> None:
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise InputDataError(f"inputs and targets must be tensors, got {type(inputs).__name__} and {type(targets).__name__}")
        if len(inputs) != len(targets):
            raise InputDataError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self._epoch = 0

    def __len__(self) -> int:
        return (len(self.inputs) + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.inputs)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self._epoch)
            order = torch.randperm(n, generator=gen)
            self._epoch += 1
        else:
            gen = torch.Generator().manual_seed(self.seed)
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x, y = self.inputs[idx], self.targets[idx]
            if self.augment is not None:
                x = self.augment(x, gen)
            yield x, y

    def take(self, num_batches: int, *, exact: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``num_batches`` batches as a list (e.g. for calibration).

        When there are fewer, all of them; with ``exact`` that is an :class:`InputDataError` instead.
        """
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ConfigError(f"num_batches must be an integer >= 1, got {num_batches!r}")
        if exact and num_batches > len(self):
            raise InputDataError(f"{num_batches} batches asked for, but the data holds {len(self)} of "
                                 f"{self.batch_size} ({len(self.inputs)} samples); ask for at most {len(self)}")
        out = []
        for i, batch in enumerate(self):
            if i >= num_batches:
                break
            out.append(batch)
        return out


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, IsADirectoryError) as exc:
        raise InputDataError(f"{path} is not a readable gzip IDX file ({type(exc).__name__}: {exc}); "
                             "reinstall the dataset (dataset-fashion-mnist)") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise InputDataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise InputDataError(f"{path} is truncated: expected {expected} values, found {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _fashion_dir(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("HESSQ_FASHION_MNIST_DIR", DEFAULT_FASHION_MNIST_DIR))


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    d = _fashion_dir(root)
    return all((d / name).exists() for pair in _FILES.values() for name in pair)


def random_crop_flip(padding: int = 2, fill: float = 0.0):
    """Augmentation for NCHW batches: random crop after padding with ``fill``, then horizontal flip."""

    def apply(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (padding,) * 4, value=fill)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
        # Advanced indexing picks each image's own crop window.
        bidx = torch.arange(n)[:, None, None, None]
        cidx = torch.arange(x.shape[1])[None, :, None, None]
        out = padded[bidx, cidx, rows, cols]
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
        return out

    return apply


def fashion_mnist(
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    batch_size: int = 128,
    shuffle: bool | None = None,
    augment: bool = False,
    limit: int | None = None,
    seed: int = 0,
) -> TensorBatches:
    """Fashion-MNIST as normalised 1×28×28 float tensors in batches.

    Reads the IDX files from ``root`` (default ``/usr/share/datasets/fashion-mnist``,
    or ``$HESSQ_FASHION_MNIST_DIR``). ``split`` is ``"train"`` (60,000) or
    ``"test"`` (10,000). ``shuffle`` defaults to True for train.
    """
    if split not in _FILES:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be an integer >= 1 (or None for all images), got {limit!r}")
    d = _fashion_dir(root)
    img_name, lbl_name = _FILES[split]
    missing = [n for n in (img_name, lbl_name) if not (d / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {d}. Install them with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass root= "
            "(or set HESSQ_FASHION_MNIST_DIR) to a folder holding the IDX .gz files."
        )
    images = _read_idx(d / img_name)
    labels = _read_idx(d / lbl_name)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    y = torch.from_numpy(labels.astype(np.int64))
    if shuffle is None:
        shuffle = split == "train"
    return TensorBatches(
        x, y, batch_size=batch_size, shuffle=shuffle, seed=seed, augment=random_crop_flip(2, fill=-FASHION_MNIST_MEAN / FASHION_MNIST_STD) if augment else None
    )


def digits(
    split: str = "train", *, batch_size: int = 64, shuffle: bool | None = None, seed: int = 0, test_fraction: float = 0.2
) -> TensorBatches:
    """scikit-learn's bundled 8×8 digits (1,797 images) as 1×8×8 tensors, split deterministically."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = int(round(len(x) * test_fraction))
    idx = order[n_test:] if split == "train" else order[:n_test]
    if shuffle is None:
        shuffle = split == "train"
    return TensorBatches(x[idx], y[idx], batch_size=batch_size, shuffle=shuffle, seed=seed)
