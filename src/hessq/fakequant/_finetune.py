"""Quantization-aware fine-tuning: straight-through gradients, optional distillation, resumable."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from hessq import _distributed as D
from hessq._checks import check_class_targets, check_inputs, check_int, check_model, check_number, split_batch
from hessq._errors import (
    ArtifactError,
    CheckpointMismatchError,
    ConfigError,
    ConfigTypeError,
    HessqError,
    HessqRuntimeError,
    InputDataError,
)
from hessq._io import check_writable, load_sealed_torch, save_sealed_torch
from hessq._utils import move_to
from hessq.graph import capture
from hessq.quantizer import ActQuantizer, WeightQuantizer

from ._hidden import HiddenStates, hidden_layer_names

#: QAT optimizers: SGD with momentum (CNNs), AdamW (transformers)
OPTIMIZERS = ("sgd", "adamw")
CHECKPOINT_FORMAT = "hessq.qat-checkpoint"
# 2: sealed (sha256), weights_only-loadable, records model signature / bit plan / configuration and every RNG state.
CHECKPOINT_VERSION = 2
_WHAT = "QAT checkpoint"
_REMEDY = "delete it to start over, pass another checkpoint path, or resume=False to overwrite it"
# Listed differences in a mismatch message; the rest are counted.
_MAX_LISTED = 6
#: How the ranks of a torch.distributed run receive their batches (see :func:`finetune`).
DistributedBatches = Literal["global", "sharded"]
DISTRIBUTED_BATCHES = ("global", "sharded")
# Buffers (quantizer scales) stay equal on every rank by construction: DDP need not broadcast them at each
# forward. torch 2.13 renamed the switch (broadcast_buffers is deprecated there).
_NO_BUFFER_BROADCAST = ({"forward_sync_buffers": False}
                        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                        else {"broadcast_buffers": False})


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened outputs, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True) * t * t


# --- argument checks --------------------------------------------------------------------


@contextlib.contextmanager
def _ranges_tracked(qmodel: nn.Module, track: bool) -> Iterator[None]:
    """Every activation quantizer follows (or not) each training batch's range while the block runs."""
    quantizers = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    before = [q.ema_in_training for q in quantizers]
    for q in quantizers:
        q.ema_in_training = q.ema_in_training and track
    try:
        yield
    finally:
        for q, was in zip(quantizers, before):
            q.ema_in_training = was


def _check_quantized(qmodel: nn.Module) -> None:
    check_model(qmodel, "qmodel")
    if not any(isinstance(m, (WeightQuantizer, ActQuantizer)) for m in qmodel.modules()):
        raise ConfigError(
            f"finetune trains a quantized model, but this {type(qmodel).__name__} has no quantizers: call "
            "q = hessq.quantize(model, plan, calibration_batches) first and pass q (the float model can be the teacher)"
        )


def _steps_per_epoch(data: Iterable) -> tuple[Iterable, int]:
    """``data`` (materialised when it has no length) and its number of batches."""
    try:
        return data, len(data)  # type: ignore[arg-type]
    except TypeError:
        pass  # no __len__, or a DataLoader over an IterableDataset whose __len__ raises
    if not isinstance(data, Iterable):
        raise InputDataError(f"train_batches must be an iterable of (inputs, targets) batches, got {type(data).__name__}")
    batches = list(data)
    return batches, len(batches)


def _check_loader(data: Iterable, checkpointing: bool) -> None:
    workers = getattr(data, "num_workers", 0)
    if checkpointing and isinstance(workers, int) and workers > 0 and getattr(data, "persistent_workers", False):
        raise ConfigError(
            "train_batches is a DataLoader with persistent_workers=True: its workers keep their random state from "
            "one epoch to the next, which a checkpoint cannot record, so a resumed run would train on other "
            "augmentations. Pass persistent_workers=False (workers restart each epoch, from seeds a checkpoint "
            "restores), or checkpoint=None"
        )


# --- what a checkpoint belongs to ---------------------------------------------------------


def _loss_name(loss_fn: Callable | None) -> str:
    if loss_fn is None:
        return "CrossEntropyLoss"
    if isinstance(loss_fn, nn.Module):
        return type(loss_fn).__name__
    return getattr(loss_fn, "__qualname__", type(loss_fn).__name__)


def _bit_plan(qmodel: nn.Module) -> dict[str, list[int] | None]:
    """Per layer [weight bits, activation bits] (None for a layer kept in float)."""
    layer_bits = getattr(qmodel, "layer_bits", None)
    if isinstance(layer_bits, Mapping):
        return {str(k): None if b is None else [int(b[0]), int(b[1])] for k, b in layer_bits.items()}
    return {name: [int(m.weight_quantizer.bits), int(getattr(m, "a_bits", 0))]
            for name, m in qmodel.named_modules() if isinstance(getattr(m, "weight_quantizer", None), WeightQuantizer)}


def _signature(qmodel: nn.Module) -> dict[str, Any]:
    """The model a checkpoint belongs to: every tensor's shape and dtype, every quantizer's bit width."""
    return {
        "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in qmodel.state_dict().items()},
        "quantizer_bits": {name: int(m.bits) for name, m in qmodel.named_modules()
                           if isinstance(m, (WeightQuantizer, ActQuantizer))},
    }


def _describe(value: Any) -> str:
    return "float" if value is None else str(value)


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _key_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any], what: str) -> list[str]:
    """One line for the names only one side has (another model lists dozens)."""
    here, there = [k for k in ours if k not in theirs], [k for k in theirs if k not in ours]
    parts = ([f"{len(here)} only in this model ({_names(here)})"] if here else []) + (
        [f"{len(there)} only in the checkpoint ({_names(there)})"] if there else [])
    return [f"the {what} differ: " + ", ".join(parts)] if parts else []


def _plan_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    out = _key_differences(ours, theirs, "quantized layers")
    for layer in ours:
        if layer in theirs and ours[layer] != theirs[layer]:
            a, b = ours[layer], theirs[layer]
            if a is None or b is None:
                out.append(f"{layer} bits {_describe(a)} here, {_describe(b)} in the checkpoint")
                continue
            for i, kind in enumerate(("weight", "activation")):
                if a[i] != b[i]:
                    out.append(f"{layer} {kind} bits {a[i]} here, {b[i]} in the checkpoint")
    return out


def _config_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    out = []
    for key in list(ours) + [k for k in theirs if k not in ours]:
        a, b = ours.get(key), theirs.get(key)
        if a == b:
            continue
        if key == "teacher":
            out.append(f"a teacher {'is' if a else 'is not'} given here, {'one was' if b else 'none was'} in the checkpoint's run")
        else:
            out.append(f"{key} {a} here, {b} in the checkpoint")
    return out


def _signature_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    bits_a, bits_b = ours["quantizer_bits"], theirs.get("quantizer_bits", {})
    tensors_a, tensors_b = ours["tensors"], theirs.get("tensors", {})
    out = _key_differences(tensors_a, tensors_b, "tensors") + _key_differences(bits_a, bits_b, "quantizers")
    for name in bits_a:
        if name in bits_b and bits_a[name] != bits_b[name]:
            out.append(f"quantizer {name} has {bits_a[name]} bits here, {bits_b[name]} in the checkpoint")
    for key in tensors_a:
        if key in tensors_b and tensors_a[key] != tensors_b[key]:
            (sa, da), (sb, db) = tensors_a[key], tensors_b[key]
            out.append(f"tensor {key} is {da} of shape {tuple(sa)} here, {db} of shape {tuple(sb)} in the checkpoint")
    return out


def _check_belongs(path: Path, state: Mapping[str, Any], plan: dict, signature: dict, config: dict) -> None:
    differences = _plan_differences(plan, state["plan"]) + _config_differences(config, state["config"])
    if not differences:  # per-quantizer bits repeat the plan's differences: list them only when the plan agrees
        differences = _signature_differences(signature, state["signature"])
    if differences:
        listed = "; ".join(differences[:_MAX_LISTED])
        more = f"; and {len(differences) - _MAX_LISTED} more" if len(differences) > _MAX_LISTED else ""
        raise CheckpointMismatchError(
            f"{path} is a QAT checkpoint of another model, bit plan or training configuration, so it cannot be "
            f"resumed: {listed}{more}. Pass another checkpoint path, resume=False to start over (overwriting it), "
            "or delete the file"
        )


# --- random number generators -----------------------------------------------------------


def _data_generators(data: Iterable) -> list[torch.Generator]:
    """The torch Generators a DataLoader (or its sampler) draws its order from, each once."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _rng_state(generators: list[torch.Generator]) -> dict[str, Any]:
    """Every RNG state that drives the data and the training, as tensors and plain values (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if cuda else [],
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "data": [g.get_state() for g in generators],
    }


def _set_rng_state(state: Mapping[str, Any], generators: list[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    for gen, gen_state in zip(generators, state["data"]):
        gen.set_state(gen_state)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _load_checkpoint(path: Path, qmodel: nn.Module, plan: dict, signature: dict, config: dict) -> dict[str, Any]:
    state = load_sealed_torch(path, kind=CHECKPOINT_FORMAT, versions={CHECKPOINT_VERSION}, what=_WHAT, remedy=_REMEDY)
    missing = [k for k in ("plan", "signature", "config", "model", "optimizer", "scheduler", "rng", "history", "step")
               if k not in state]
    if missing:
        raise ArtifactError(f"{path} is a QAT checkpoint without {', '.join(missing)}; {_REMEDY}")
    _check_belongs(path, state, plan, signature, config)
    return state


# --- ranks of a torch.distributed run ------------------------------------------------------


class OtherRankError(HessqRuntimeError):
    """Another rank of a torch.distributed run stopped on an error of its own (which it reports)."""


class _Ranks:
    """This process's place in a torch.distributed run; one rank of one in a single process.

    Every collective that can meet an error goes through :meth:`agree`: each rank says whether it failed,
    so that a mistake on one rank stops every rank with a message instead of leaving the others waiting.
    """

    def __init__(self, group: Any, batches: str) -> None:
        self.group = group
        self.on = D.is_distributed(group)
        self.rank, self.world = D.rank_and_world(group)
        self.batches = batches
        nccl = self.on and dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def agree(self, error: BaseException | None, values: list[float], what: str) -> torch.Tensor:
        """Every rank's ``values`` (rows in rank order, float64). A rank that failed raises its own error and
        the others an :class:`OtherRankError` naming it."""
        if not self.on:
            if error is not None:
                raise error
            return torch.tensor([values], dtype=torch.float64)
        row = torch.tensor([float(error is not None), *values], dtype=torch.float64, device=self.device)
        table = D.all_gather_rows(row, self.group).cpu()
        if error is not None:
            raise error
        failed = [r for r in range(self.world) if table[r, 0]]
        if failed:
            raise OtherRankError(f"rank {failed[0]} of {self.world} stopped while {what}; its own error above says "
                                 "why (every rank stops with it)")
        return table[:, 1:]

    def same(self, table: torch.Tensor, names: list[str], remedy: str) -> None:
        """A :class:`ConfigError` unless every rank gave the same values."""
        differ = [f"{name} {[int(v) if float(v).is_integer() else float(v) for v in table[:, i].tolist()]}"
                  for i, name in enumerate(names) if bool((table[:, i] != table[0, i]).any())]
        if differ:
            raise ConfigError(f"the {self.world} ranks disagree, by rank: {'; '.join(differ)}. {remedy}")

    def shard(self, x: Any, y: Any) -> tuple[Any, Any, int, int]:
        """(this rank's inputs, targets, its rows, the global batch's rows; the latter unknown, 0, when sharded)."""
        try:
            rows = D.batch_rows((x, y))
        except ValueError as exc:
            raise InputDataError(f"a training batch cannot be split over ranks: {exc}") from None
        if rows is None:
            raise InputDataError("a training batch holds no tensors, so it cannot be split over ranks")
        if self.batches == "global":
            if rows < self.world:
                raise InputDataError(f"a global batch of {rows} rows cannot be split over {self.world} ranks; give "
                                     f"batches of at least {self.world} rows")
            start, stop = D.shard_range(rows, self.rank, self.world)
            return D.slice_rows(x, start, stop), D.slice_rows(y, start, stop), stop - start, rows
        if rows == 0:
            raise InputDataError(f"rank {self.rank}'s part of a global batch is empty; with distributed_batches='sharded' "
                                 "every rank must give at least one row of every batch")
        return x, y, rows, 0


def _check_no_batch_statistics(qmodel: nn.Module) -> None:
    batchnorms = [n for n, m in qmodel.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batchnorms:
        raise ConfigError(
            f"the model keeps float BatchNorm layers ({_names(batchnorms)}) that would normalise each rank's part "
            "of a batch by its own statistics, so ranks would train different models; quantize the model with "
            "BatchNorm folded into its convs (hessq.quantize folds every BN that follows a conv), or train on one rank"
        )


# --- training ---------------------------------------------------------------------------


def finetune(
    qmodel: nn.Module,
    train_batches: Iterable,
    *,
    teacher: nn.Module | None = None,
    epochs: float = 1,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    temperature: float = 1.0,
    distill_weight: float = 1.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    distributed_batches: DistributedBatches = "global",
    group: Any = None,
    track_ranges: bool = True,
    hidden_weight: float = 0.0,
    hidden_layers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Quantization-aware training of a model from :func:`hessq.quantize`, in place.

    ``optimizer`` ``"sgd"`` (with ``momentum``; CNNs) or ``"adamw"`` (transformers, which SGD trains poorly), with
    a per-step cosine schedule from ``lr`` to 0 over ``epochs`` (which may be
    fractional: ``epochs=0.5`` trains half an epoch with the whole schedule).
    Gradients pass the rounding by the straight-through estimator; activation ranges
    follow an EMA of each batch (HAWQ's rule), or stay as calibrated with ``track_ranges=False``.
    With ``teacher`` the loss is
    ``distill_weight·KL(teacher‖student)·T² + (1 − distill_weight)·task loss``, plus, with ``hidden_weight`` > 0,
    ``hidden_weight`` times the mean over ``hidden_layers`` of the mean squared difference between the student's and
    the teacher's outputs of that module (hidden-state distillation, as TinyBERT; every position, padding included).
    ``hidden_layers`` are module paths of the original model (``bert.encoder.layer.0.output.LayerNorm``), default
    every LayerNorm (a BERT's embeddings and both norms of every layer); a quantized LayerNorm's output is its
    quantized one.
    ``seed`` seeds torch's, Python's ``random`` and NumPy's global generators.

    ``train_batches``: (inputs, targets) pairs. Data with a length (a list, a DataLoader, hessq's
    datasets) is iterated afresh each epoch, so shuffling and random augmentation differ per epoch.
    Data without a length (a one-shot iterator or generator, a DataLoader over an IterableDataset)
    is **read once into memory** and those batches are reused every epoch, in the same order.

    **Under torch.distributed** (``torchrun``, the process group started, e.g. by
    :func:`hessq.sensitivity.init_from_env`; ``group`` picks another than the default) the model trains
    under :class:`~torch.nn.parallel.DistributedDataParallel`, and a run on W ranks trains on the same
    global batches as one process: ``distributed_batches="global"`` (the default): every rank passes the
    same global batches (the same data, seed and order) and rank r trains on its consecutive part of each
    (rows split as ``torch.tensor_split`` does; every tensor of a tuple or dict batch is cut along dim 0);
    ranks that received different batches are refused. ``"sharded"``: each rank passes its own part (a
    ``DistributedSampler``, or your own split); the global batch is their concatenation in rank order, and
    every rank must give the same number of batches. Each rank's loss is weighted by its share of the
    global batch, so the averaged gradients are those of the global batch's mean loss (``loss_fn`` must be
    a mean over the batch's samples, as the default cross-entropy is); the activation ranges each step
    follows are the global batch's (min/max all-reduced, percentiles over the gathered values), and every
    parameter and buffer starts from rank 0's, so all ranks hold identical weights and quantizer state
    throughout. A run on W ranks equals a one-process run on the same global batches up to float rounding
    (on the pretrained ResNet-20, 20 steps of W4A8 QAT: within 6e-8; see README). The teacher runs on each
    rank's part. The model must have no float BatchNorm (hessq folds BN into the convs). Random ops inside the
    model (dropout) draw the same numbers on every rank. The checkpoint is written by rank 0 alone and read by
    every rank (put it on a file system all ranks see); a run may resume on another number of ranks. An error on one rank stops
    every rank, each naming it.

    ``checkpoint``: a file written (atomically, sealed with a checksum) at the end of each epoch,
    every ``checkpoint_every`` steps and when ``max_steps`` stops the run. With ``resume`` an existing
    one is loaded and training continues where it stopped, giving the same weights, bit for bit, as
    an uninterrupted run, for any data that iterates the same way again, a shuffling DataLoader with
    random augmentation included: the checkpoint holds the torch (CPU and CUDA), Python and NumPy RNG
    states, and those of the DataLoader's or sampler's own ``generator``, both at the start of the
    epoch (to rebuild its order and skip the batches already trained on) and at the checkpoint.
    Worker processes (``num_workers > 0``) resume exactly too, as they are seeded from those states
    each epoch; but a DataLoader with ``persistent_workers=True`` is refused with a checkpoint: its
    workers' random state outlives an epoch and no checkpoint can hold it. The checkpoint records the model
    (tensor names, shapes, dtypes, quantizer bits), the bit plan and the training configuration;
    resuming it for anything else raises :class:`hessq.CheckpointMismatchError` saying what differs
    (``max_steps``, ``checkpoint_every`` and ``progress`` may change). A damaged file is refused with
    an :class:`hessq.ArtifactError`; nothing in it is ever run (weights-only loading).
    ``max_steps`` stops early (an interruption: the schedule is still that of ``epochs``), counting steps
    already done.

    Returns the history: per-epoch mean loss (of the global batches), the number of steps done,
    ``resumed_from_step`` (the step the checkpoint was at; None for a fresh start) and ``world_size``.
    With ``progress`` a resumed run says so (rank 0 alone shows progress).
    """
    # Every check before any training: a mistake costs no time.
    _check_quantized(qmodel)
    if teacher is not None:
        teacher = capture(check_model(teacher, "teacher"))
    epochs = check_number(epochs, "epochs", low=0, strict=True)
    lr = check_number(lr, "lr", low=0, strict=True)
    momentum = check_number(momentum, "momentum", low=0)
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    weight_decay = check_number(weight_decay, "weight_decay", low=0)
    temperature = check_number(temperature, "temperature", low=0, strict=True)
    distill_weight = check_number(distill_weight, "distill_weight", low=0)
    if distill_weight > 1:
        raise ConfigError(f"distill_weight must be in [0, 1], got {distill_weight}")
    if max_steps is not None:
        max_steps = check_int(max_steps, "max_steps", low=0)
    if checkpoint_every is not None:
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every", low=1)
    seed = check_int(seed, "seed")
    if not isinstance(track_ranges, bool):
        raise ConfigTypeError(f"track_ranges must be True or False, got {track_ranges!r}")
    hidden_weight = check_number(hidden_weight, "hidden_weight", low=0)
    hidden: HiddenStates | None = None
    if hidden_weight > 0:
        if teacher is None:
            raise ConfigError("hidden_weight > 0 distills hidden states from a teacher: pass teacher=<the float model>")
        hidden_layers = hidden_layer_names(teacher, hidden_layers)
        hidden = HiddenStates(qmodel, teacher, hidden_layers)
    elif hidden_layers is not None:
        raise ConfigError("hidden_layers is given but hidden_weight is 0, so nothing would be distilled: "
                          "pass hidden_weight > 0 (e.g. 1.0) too")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigTypeError(f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
    if distributed_batches not in DISTRIBUTED_BATCHES:
        raise ConfigError(f"distributed_batches must be one of {DISTRIBUTED_BATCHES}, got {distributed_batches!r}: "
                          "'global' when every rank passes the same global batches, 'sharded' when each passes its part")
    if group is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"this process is one of {os.environ['WORLD_SIZE']} launched by torchrun, but no torch.distributed process "
            "group is started, so each would train alone on every batch and all would write the checkpoint: call "
            "hessq.sensitivity.init_from_env() (or torch.distributed.init_process_group) before hessq.finetune")
    ranks = _Ranks(group, distributed_batches)
    if ranks.on:
        _check_no_batch_statistics(qmodel)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    resuming = ckpt_path is not None and resume and (ckpt_path.exists() or ckpt_path.is_symlink())
    default_loss = loss_fn is None
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    device = next(p.device for p in qmodel.parameters())
    plan, signature = _bit_plan(qmodel), _signature(qmodel)
    history: dict[str, Any] = {"epoch_loss": [], "steps": 0}
    step = 0
    state: dict[str, Any] | None = None
    failure: BaseException | None = None
    steps_per_epoch = 0
    try:  # what may differ between ranks (their data, their view of the checkpoint) is agreed on below
        if ckpt_path is not None and not resuming:
            check_writable(ckpt_path, "QAT checkpoint")  # an existing path is read first: a directory there is refused as a checkpoint
        _check_loader(train_batches, ckpt_path is not None)
        train_batches, steps_per_epoch = _steps_per_epoch(train_batches)
        if steps_per_epoch == 0:
            raise InputDataError("train_batches holds no batches; pass at least one (inputs, targets) batch")
        generators = _data_generators(train_batches)
        config = {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                  **({"optimizer": optimizer} if optimizer != "sgd" else {}),
                  "temperature": temperature, "distill_weight": distill_weight, "teacher": teacher is not None,
                  "steps_per_epoch": steps_per_epoch, "seed": seed,
                  "loss_fn": _loss_name(None if default_loss else loss_fn), "data_generators": len(generators),
                  **({"track_ranges": False} if not track_ranges else {}),
                  **({"hidden_weight": hidden_weight, "hidden_layers": list(hidden.names)} if hidden is not None else {})}
        if resuming:
            assert ckpt_path is not None
            state = _load_checkpoint(ckpt_path, qmodel, plan, signature, config)
            check_writable(ckpt_path, "QAT checkpoint")
            step = int(state["step"])
    except HessqError as exc:
        failure = exc
    agreed = ranks.agree(failure, [steps_per_epoch, step], "reading train_batches and the checkpoint")
    ranks.same(agreed, ["batches per epoch", "checkpoint step"],
               "Every rank must pass as many batches per epoch and see the same checkpoint file")
    total_steps = max(1, round(epochs * steps_per_epoch))  # a fractional epoch is a shorter schedule

    _seed_everything(seed)
    params = [p for p in qmodel.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    resumed: dict[str, Any] | None = None  # the checkpoint's RNG states, applied when its epoch starts
    # The model as handed in: a bad first batch is refused leaving it so (its forward moves running statistics).
    pristine: dict[str, torch.Tensor] | None = {k: v.clone() for k, v in qmodel.state_dict().items()}
    if state is not None:
        qmodel.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = dict(state["history"])
        resumed = state["rng"]
    history["resumed_from_step"] = step if resumed is not None else None
    history["world_size"] = ranks.world
    limit = min(total_steps, max_steps) if max_steps is not None else total_steps
    show = progress and ranks.rank == 0
    if resumed is not None and show:
        tqdm.write(f"finetune: resuming {ckpt_path} at step {step} of {total_steps}")

    model: nn.Module = qmodel
    if ranks.on:
        D.broadcast_state(qmodel, ranks.group)  # quantizer scales and observers too, which DDP leaves alone
        # static_graph: DDP finds parameters the loss does not reach (a pooler beside the head) on its own
        model = DistributedDataParallel(qmodel, device_ids=[device] if device.type == "cuda" else None,
                                        process_group=ranks.group, static_graph=True, **_NO_BUFFER_BROADCAST)

    epoch_rng: dict[str, Any] | None = None

    def save() -> None:
        if ckpt_path is None:
            return
        failed: BaseException | None = None
        if ranks.rank == 0:
            kept = {k: v for k, v in history.items() if k not in ("resumed_from_step", "world_size")}
            try:
                save_sealed_torch(ckpt_path, {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "plan": plan,
                    "signature": signature,
                    "config": config,
                    "model": dict(qmodel.state_dict()),
                    "optimizer": opt.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": {"epoch_start": epoch_rng, "now": _rng_state(generators)},
                    "history": kept,
                    "step": step,
                })
            except Exception as exc:  # noqa: BLE001 - handed to agree(), which re-raises it here
                failed = exc
        ranks.agree(failed, [], "rank 0 wrote the checkpoint")  # also a barrier: the file is there for every rank

    if teacher is not None:
        teacher.eval()
    num_classes: int | None = None
    bar = tqdm(total=limit, initial=min(step, limit), desc="finetune", disable=not show)
    try:
        with (D.synced_ranges(ranks.group), _ranges_tracked(qmodel, track_ranges),
              hidden.recording() if hidden is not None else contextlib.nullcontext()):
            while step < limit:
                epoch, skip = divmod(step, steps_per_epoch)
                if resumed is not None and skip:
                    _set_rng_state(resumed["epoch_start"], generators)  # rebuild this epoch's order ...
                elif resumed is not None:
                    _set_rng_state(resumed["now"], generators)
                epoch_rng = _rng_state(generators)  # before the iterator exists: a DataLoader draws its order from it
                if hasattr(train_batches, "set_epoch"):
                    train_batches.set_epoch(epoch)
                model.train()
                batches = iter(train_batches)
                for _ in range(skip):  # ... skip the batches already trained on ...
                    next(batches, None)
                if resumed is not None and skip:
                    _set_rng_state(resumed["now"], generators)  # ... and go on from the checkpoint's state
                resumed = None
                running = history.get("running", 0.0) if skip else 0.0
                epoch_end = min(limit, (epoch + 1) * steps_per_epoch)
                while step < epoch_end:  # stops before fetching a batch it would not train on (that draws random numbers)
                    try:
                        x, y, share = _next_batch(batches, qmodel, ranks, step - epoch * steps_per_epoch, epoch,
                                                  steps_per_epoch, device)
                        out = _forward(qmodel, x, model)
                        failed = None
                        if default_loss and isinstance(out, torch.Tensor) and out.ndim == 2:
                            num_classes = num_classes or out.shape[1]
                            try:
                                check_class_targets(y, num_classes, where="training targets")
                            except InputDataError as exc:
                                failed = exc
                        loss = loss_fn(out, y) if failed is None else out.new_zeros(())
                        if teacher is not None and failed is None:
                            with torch.no_grad():
                                target = teacher(x)
                            loss = distill_weight * distillation_loss(out, target, temperature) + (1 - distill_weight) * loss
                            if hidden is not None:
                                loss = loss + hidden_weight * hidden.loss()
                        elif hidden is not None:
                            hidden.clear()
                        # the global batch's mean loss: each rank's mean weighted by its share of the rows
                        global_loss = float(ranks.agree(failed, [float(loss.detach()) * share],
                                                        "checking training targets").sum())
                    except (InputDataError, OtherRankError):  # bad data on this rank or another
                        if pristine is not None:
                            qmodel.load_state_dict(pristine)
                            qmodel.eval()
                        raise
                    pristine = None
                    if not math.isfinite(global_loss):
                        raise HessqRuntimeError(f"the loss became {global_loss} at step {step}; lower lr (now {lr})")
                    opt.zero_grad(set_to_none=True)
                    # DDP averages the ranks' gradients: scaled by share·W they sum to the global mean's
                    (loss * (share * ranks.world) if ranks.on and share * ranks.world != 1 else loss).backward()
                    opt.step()
                    scheduler.step()
                    step += 1
                    running += global_loss
                    history["running"] = running
                    history["steps"] = step
                    bar.update(1)
                    bar.set_postfix(loss=f"{running / max(step - epoch * steps_per_epoch, 1):.4f}", epoch=epoch + 1)
                    if checkpoint_every and step % checkpoint_every == 0 and step < epoch_end:
                        save()
                epoch_mean = running / max(step - epoch * steps_per_epoch, 1)
                if step % steps_per_epoch == 0 or step >= total_steps:
                    history["epoch_loss"].append(epoch_mean)
                    history["running"] = 0.0
                    save()
                else:  # stopped by max_steps mid-epoch: the checkpoint keeps the running sum, the caller gets the mean so far
                    save()
                    history["epoch_loss"].append(epoch_mean)
    finally:
        bar.close()
    qmodel.eval()
    return history


def _next_batch(batches: Iterator, qmodel: nn.Module, ranks: _Ranks, index: int, epoch: int, steps_per_epoch: int,
                device: torch.device) -> tuple[Any, Any, float]:
    """(inputs, targets) this rank trains on next, on ``device``, and its share of the global batch's rows.

    Under torch.distributed the ranks agree on the batch first (one all-gather): a batch refused on one
    rank stops all, and in ``"global"`` mode ranks holding different global batches are refused.
    """
    failed: InputDataError | None = None
    x = y = None
    rows = total = 1  # a single process trains on the whole batch
    check = 0.0
    try:
        try:
            batch = next(batches)
        except StopIteration:
            raise InputDataError(f"train_batches gave {index} batches in epoch {epoch + 1}, but its len() is "
                                 f"{steps_per_epoch}") from None
        x, y = split_batch(batch, where="training batch", model=qmodel)
        check_inputs(x, qmodel, where="training inputs")
        if ranks.on:
            check = D.checksum((x, y)) if ranks.batches == "global" else 0.0
            x, y, rows, total = ranks.shard(x, y)
    except InputDataError as exc:
        failed = exc
    table = ranks.agree(failed, [rows, check], "reading its training batch")
    if ranks.batches == "sharded":
        total = int(table[:, 0].sum())
    elif not torch.allclose(table[:, 1], table[0, 1].expand(ranks.world), rtol=1e-9, atol=0.0):
        # a tolerance, not equality: float64 sums may round differently on ranks with other CPUs or GPUs
        raise ConfigError(
            f"the ranks hold different global batches at step {index + 1} of epoch {epoch + 1} (sums by rank "
            f"{table[:, 1].tolist()}): with distributed_batches='global' every rank must pass the same global batches "
            "(same data, seed and order); pass distributed_batches='sharded' when each rank reads its own part "
            "(a DistributedSampler)")
    return move_to(x, device), move_to(y, device), rows / total


def _forward(qmodel: nn.Module, x: Any, model: nn.Module | None = None) -> Any:
    """``model(x)`` (``qmodel`` itself, or its DDP wrapper), with a shape ``qmodel`` was not calibrated on named
    instead of a deep torch error."""
    try:
        return (model or qmodel)(x)
    except HessqError:
        raise
    except RuntimeError as exc:
        expected = getattr(qmodel, "input_shape", None)
        if isinstance(x, torch.Tensor) and expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise InputDataError(f"training inputs have shape {tuple(x.shape)}, but the model was calibrated on inputs "
                                 f"of shape (batch, {', '.join(map(str, expected))}): give batches of that shape") from exc
        raise
