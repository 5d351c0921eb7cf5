"""Datasets that ship on this machine: Fashion-MNIST (Debian) and scikit-learn's digits."""

from hessq.data._metrics import accuracy
from hessq.data._datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    TensorBatches,
    digits,
    fashion_mnist,
)

__all__ = [
    "accuracy",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "TensorBatches",
    "digits",
    "fashion_mnist",
]

from hessq.data._photos import PHOTOS, load_photos, photo_crops  # noqa: E402

__all__ += ["PHOTOS", "load_photos", "photo_crops"]

from hessq.data._text import TextBatches, TextSplit, bbc_news, bbc_news_texts, text_batches, tweets, tweets_texts  # noqa: E402

__all__ += ["TextBatches", "TextSplit", "bbc_news", "bbc_news_texts", "text_batches", "tweets", "tweets_texts"]

from hessq.data._detection import (  # noqa: E402
    DEFAULT_DETECTION_SIZES,
    FASHION_MNIST_CLASSES,
    DetectionBatches,
    DetectionSet,
    coco_evaluate,
    detection_set,
    encode_targets,
    normalize_canvases,
)

__all__ += ["DEFAULT_DETECTION_SIZES", "FASHION_MNIST_CLASSES", "DetectionBatches", "DetectionSet", "coco_evaluate",
            "detection_set", "encode_targets", "normalize_canvases"]
