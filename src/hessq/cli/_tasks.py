"""Models that come with their task (data, score): the fine-tuned MiniLMs and the CoDeNet detector, and
Hugging Face models named on the command line (``hf:<folder>``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from hessq._errors import ConfigError

#: --model names that bring their own data and score
TASK_MODELS = ("minilm-bbc", "minilm-tweets", "codenet")
#: --data names of the bundled text tasks: (loader name in hessq.data, max tokens)
TEXT_DATA = {"bbc": ("bbc_news", 256), "tweets": ("tweets", 64)}
_TRAIN_BATCH = {"bbc": 16, "tweets": 32}


@dataclass
class Task:
    """What ``hessq compress`` and ``hessq demo`` run on: a model, its data, and how results are scored."""

    name: str
    model: nn.Module
    train: Iterable | None
    evaluation: Iterable | None
    input_shape: tuple[int, ...] | None = None
    metric: Callable | None = None
    metric_name: str = "top-1"
    loss_fn: Callable | None = None


def is_hf_spec(spec: str) -> bool:
    return spec.startswith("hf:")


def check_hf_spec(spec: str) -> None:
    """``hf:<folder>`` names a folder with a config.json, or ``hf:minilm-bbc`` / ``hf:minilm-tweets``."""
    target = spec[3:]
    if target in TASK_MODELS:
        return
    folder = Path(target)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--model {spec}: {folder} is not a Hugging Face model folder (no config.json); give "
                          "hf:<folder saved by save_pretrained> or one of " + ", ".join(f"hf:{m}" for m in TASK_MODELS[:2]))


def text_data(name: str, *, seed: int = 0, tokenizer: str | os.PathLike | None = None) -> tuple[Iterable, Iterable, int]:
    """(train, test, max tokens) of a bundled text task: dict batches of token ids, mask and labels, tokenized by
    ``tokenizer`` (a tokenizer.json or its folder; default MiniLM's)."""
    import hessq.data as data

    loader, length = TEXT_DATA[name]
    fn = getattr(data, loader)
    return (fn("train", batch_size=_TRAIN_BATCH[name], shuffle=True, seed=seed, tokenizer=tokenizer),
            fn("test", batch_size=64, tokenizer=tokenizer), length)


def _check_text_model(model: nn.Module, folder: str, data_name: str, train: Any) -> None:
    """A user's Hugging Face folder against a bundled text task: the same padding id and number of classes."""
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    if int(pad) != train.pad_id:
        raise ConfigError(f"{folder}'s tokenizer pads with id {train.pad_id} but its model's pad_token_id is {pad}: "
                          "hessq derives the attention mask from the padding; make the two agree")
    classes = len(train.class_names)
    if int(config.num_labels) != classes:
        raise ConfigError(f"the model in {folder} classifies {config.num_labels} labels; {data_name} has {classes} "
                          f"classes. Compress a model fine-tuned on {data_name} (for example with "
                          "hessq.models.finetune_classifier), or pass your own data as package.module:function")


def hf_model(spec: str, num_labels: int | None = None, progress: bool = True) -> nn.Module:
    """The Hugging Face model ``hf:<folder>`` (eager attention: the Hessian needs double backward)."""
    from hessq._compat import import_transformers

    target = spec[3:] if is_hf_spec(spec) else spec
    if target in ("minilm-bbc", "minilm-tweets"):
        from hessq.models import minilm_finetuned

        return minilm_finetuned(target.split("-", 1)[1], progress=progress)
    tr = import_transformers()
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    return tr.AutoModelForSequenceClassification.from_pretrained(target, attn_implementation="eager", **kwargs).eval()


def load_task(model_spec: str, data_spec: str, *, seed: int = 0, default_data: str = "fashion-mnist",
              progress: bool = True) -> Task | None:
    """The task of a model that brings its data (``minilm-tweets``, ``codenet``), or of a Hugging Face model with
    a bundled text data set (``--model hf:<folder> --data bbc``); None for the image models' own path. ``progress``
    shows the first-use training of a bundled model (MiniLM's fine-tune, CoDeNet's)."""
    name = model_spec[3:] if is_hf_spec(model_spec) else model_spec
    if name == "codenet":
        from hessq.models import codenet_task

        t = codenet_task(progress=progress)
        return Task(f"codenet ({t.info['variant']} deformable decoder)", t.model, t.train_batches, t.test_batches,
                    input_shape=(3, 128, 128), metric=lambda model, _data: t.evaluate(model)["AP50"] / 100,
                    metric_name="AP50", loss_fn=t.loss_fn)
    if name in ("minilm-bbc", "minilm-tweets"):
        task = name.split("-", 1)[1]
        if data_spec not in (default_data, task):
            raise ConfigError(f"--model {model_spec} is fine-tuned on {task}; --data must be {task} (or left out)")
        data_spec = task
    if data_spec in TEXT_DATA:
        if name.startswith("minilm-"):
            train, test, length = text_data(data_spec, seed=seed)
            model = hf_model(name, progress=progress)
        else:  # the user's folder: its own tokenizer, checked against its model
            if not (Path(name) / "tokenizer.json").is_file():
                raise ConfigError(f"--data {data_spec} tokenizes with the model's own tokenizer, and {name} has no "
                                  "tokenizer.json: save it there (tokenizer.save_pretrained(folder))")
            train, test, length = text_data(data_spec, seed=seed, tokenizer=name)
            model = hf_model(f"hf:{name}", progress=progress)
            _check_text_model(model, name, data_spec, train)
        return Task(f"{name} on {data_spec}", model, train, test, input_shape=(length,))
    if is_hf_spec(model_spec) and ":" not in data_spec:
        raise ConfigError(f"--model {model_spec} needs text data: --data bbc, tweets or package.module:function "
                          "returning dict batches (input_ids, attention_mask, labels)")
    return None  # the generic path: a model spec and a data spec of their own
