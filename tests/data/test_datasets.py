import pytest
import torch

from hessq.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, TensorBatches, digits, fashion_mnist


def test_fashion_mnist_sizes_and_normalisation(fashion_test):
    x, y = fashion_test.inputs, fashion_test.targets
    assert x.shape == (10_000, 1, 28, 28) and y.shape == (10_000,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10)) and (y.bincount() == 1000).all()
    # undo the normalisation: pixels back in [0, 1], mean close to the published one
    pixels = x * FASHION_MNIST_STD + FASHION_MNIST_MEAN
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert abs(float(pixels.mean()) - 0.2860) < 0.01
    train = fashion_mnist("train", batch_size=1000)
    assert len(train.inputs) == 60_000 and len(train) == 60


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        fashion_mnist("validation")


def test_truncated_idx_file_is_refused(tmp_path):
    import gzip
    import shutil

    from hessq.data._datasets import DEFAULT_FASHION_MNIST_DIR

    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(DEFAULT_FASHION_MNIST_DIR / name, tmp_path / name)
    with gzip.open(DEFAULT_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        data = f.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist("test", root=tmp_path)


def test_shuffled_batches_are_reproducible_per_epoch():
    x, y = torch.arange(100.0).reshape(100, 1), torch.arange(100)
    a = TensorBatches(x, y, batch_size=10, shuffle=True, seed=3)
    b = TensorBatches(x, y, batch_size=10, shuffle=True, seed=3)
    first = [t.tolist() for t, _ in a]
    assert first == [t.tolist() for t, _ in b]
    second = [t.tolist() for t, _ in a]
    assert second != first  # a new order each epoch
    a.set_epoch(0)
    assert [t.tolist() for t, _ in a] == first
    assert sorted(v for batch in first for v in batch) == [[float(i)] for i in range(100)]


def test_augmentation_keeps_shape_and_content():
    train = fashion_mnist("train", batch_size=64, augment=True, limit=256)
    x, _ = next(iter(train))
    plain = fashion_mnist("train", batch_size=64, shuffle=True, limit=256)
    xp, _ = next(iter(plain))
    assert x.shape == (64, 1, 28, 28)
    # crops shift by at most 2 pixels and flips mirror: the per-image pixel mass barely changes
    background = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
    assert torch.allclose((x - background).sum((1, 2, 3)), (xp - background).sum((1, 2, 3)), rtol=0.15)


def test_digits_split_is_deterministic_and_disjoint():
    train, test = digits("train"), digits("test")
    assert len(train.inputs) + len(test.inputs) == 1797
    assert train.inputs.shape[1:] == (1, 8, 8)
    assert torch.equal(digits("test").inputs, test.inputs)
