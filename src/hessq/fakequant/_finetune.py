"""Quantization-aware fine-tuning: straight-through gradients, optional distillation, resumable."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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
from hessq.graph import capture
from hessq.quantizer import ActQuantizer, WeightQuantizer

CHECKPOINT_FORMAT = "hessq.qat-checkpoint"
# 2: sealed (sha256), weights_only-loadable, records model signature / bit plan / configuration and every RNG state.
CHECKPOINT_VERSION = 2
_WHAT = "QAT checkpoint"
_REMEDY = "delete it to start over, pass another checkpoint path, or resume=False to overwrite it"
# Listed differences in a mismatch message; the rest are counted.
_MAX_LISTED = 6


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened outputs, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True) * t * t


# --- argument checks --------------------------------------------------------------------


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


# --- training ---------------------------------------------------------------------------


def finetune(
    qmodel: nn.Module,
    train_batches: Iterable,
    *,
    teacher: nn.Module | None = None,
    epochs: float = 1,
    lr: float = 1e-3,
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
) -> dict[str, Any]:
    """Quantization-aware training of a model from :func:`hessq.quantize`, in place.

    SGD with momentum and a per-step cosine schedule from ``lr`` to 0 over ``epochs`` (which may be
    fractional: ``epochs=0.5`` trains half an epoch with the whole schedule).
    Gradients pass the rounding by the straight-through estimator; activation ranges
    follow an EMA of each batch. With ``teacher`` the loss is
    ``distill_weight·KL(teacher‖student)·T² + (1 − distill_weight)·task loss``.
    ``seed`` seeds torch's, Python's ``random`` and NumPy's global generators.

    ``train_batches``: (inputs, targets) pairs. Data with a length (a list, a DataLoader, hessq's
    datasets) is iterated afresh each epoch, so shuffling and random augmentation differ per epoch.
    Data without a length (a one-shot iterator or generator, a DataLoader over an IterableDataset)
    is **read once into memory** and those batches are reused every epoch, in the same order.

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

    Returns the history: per-epoch mean loss, the number of steps done, and ``resumed_from_step``
    (the step the checkpoint was at; None for a fresh start). With ``progress`` a resumed run says so.
    """
    # Every check before any training: a mistake costs no time.
    _check_quantized(qmodel)
    if teacher is not None:
        teacher = capture(check_model(teacher, "teacher"))
    epochs = check_number(epochs, "epochs", low=0, strict=True)
    lr = check_number(lr, "lr", low=0, strict=True)
    momentum = check_number(momentum, "momentum", low=0)
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
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigTypeError(f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    resuming = ckpt_path is not None and resume and (ckpt_path.exists() or ckpt_path.is_symlink())
    if ckpt_path is not None and not resuming:
        check_writable(ckpt_path, "QAT checkpoint")  # an existing path is read first: a directory there is refused as a checkpoint
    _check_loader(train_batches, ckpt_path is not None)
    train_batches, steps_per_epoch = _steps_per_epoch(train_batches)
    if steps_per_epoch == 0:
        raise InputDataError("train_batches holds no batches; pass at least one (inputs, targets) batch")
    total_steps = max(1, round(epochs * steps_per_epoch))  # a fractional epoch is a shorter schedule
    default_loss = loss_fn is None
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    device = next(p.device for p in qmodel.parameters())
    generators = _data_generators(train_batches)

    plan, signature = _bit_plan(qmodel), _signature(qmodel)
    config = {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
              "temperature": temperature, "distill_weight": distill_weight, "teacher": teacher is not None,
              "steps_per_epoch": steps_per_epoch, "seed": seed,
              "loss_fn": _loss_name(None if default_loss else loss_fn), "data_generators": len(generators)}

    _seed_everything(seed)
    params = [p for p in qmodel.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    history: dict[str, Any] = {"epoch_loss": [], "steps": 0}
    step = 0
    resumed: dict[str, Any] | None = None  # the checkpoint's RNG states, applied when its epoch starts
    # The model as handed in: a bad first batch is refused leaving it so (its forward moves running statistics).
    pristine: dict[str, torch.Tensor] | None = {k: v.clone() for k, v in qmodel.state_dict().items()}
    if resuming:
        assert ckpt_path is not None
        state = _load_checkpoint(ckpt_path, qmodel, plan, signature, config)
        check_writable(ckpt_path, "QAT checkpoint")
        qmodel.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = dict(state["history"])
        step = int(state["step"])
        resumed = state["rng"]
    history["resumed_from_step"] = step if resumed is not None else None
    limit = min(total_steps, max_steps) if max_steps is not None else total_steps
    if resumed is not None and progress:
        tqdm.write(f"finetune: resuming {ckpt_path} at step {step} of {total_steps}")

    epoch_rng: dict[str, Any] | None = None

    def save() -> None:
        if ckpt_path is None:
            return
        kept = {k: v for k, v in history.items() if k != "resumed_from_step"}
        save_sealed_torch(ckpt_path, {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "plan": plan,
            "signature": signature,
            "config": config,
            "model": dict(qmodel.state_dict()),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"epoch_start": epoch_rng, "now": _rng_state(generators)},
            "history": kept,
            "step": step,
        })

    if teacher is not None:
        teacher.eval()
    num_classes: int | None = None
    bar = tqdm(total=limit, initial=min(step, limit), desc="finetune", disable=not progress)
    try:
        while step < limit:
            epoch, skip = divmod(step, steps_per_epoch)
            if resumed is not None and skip:
                _set_rng_state(resumed["epoch_start"], generators)  # rebuild this epoch's order ...
            elif resumed is not None:
                _set_rng_state(resumed["now"], generators)
            epoch_rng = _rng_state(generators)  # before the iterator exists: a DataLoader draws its order from it
            if hasattr(train_batches, "set_epoch"):
                train_batches.set_epoch(epoch)
            qmodel.train()
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
                    batch = next(batches)
                except StopIteration:
                    raise InputDataError(f"train_batches gave {step - epoch * steps_per_epoch} batches in epoch "
                                         f"{epoch + 1}, but its len() is {steps_per_epoch}") from None
                try:
                    x, y = split_batch(batch, where="training batch")
                    check_inputs(x, qmodel, where="training inputs")
                    x, y = x.to(device), y.to(device)
                    out = _forward(qmodel, x)
                    if default_loss and isinstance(out, torch.Tensor) and out.ndim == 2:
                        num_classes = num_classes or out.shape[1]
                        check_class_targets(y, num_classes, where="training targets")
                except InputDataError:
                    if pristine is not None:
                        qmodel.load_state_dict(pristine)
                        qmodel.eval()
                    raise
                pristine = None
                loss = loss_fn(out, y)
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(x)
                    loss = distill_weight * distillation_loss(out, target, temperature) + (1 - distill_weight) * loss
                if not torch.isfinite(loss):
                    raise HessqRuntimeError(f"the loss became {loss.item()} at step {step}; lower lr (now {lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                running += float(loss.detach())
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


def _forward(qmodel: nn.Module, x: Any) -> Any:
    """``qmodel(x)``, with a shape the model was not calibrated on named instead of a deep torch error."""
    try:
        return qmodel(x)
    except HessqError:
        raise
    except RuntimeError as exc:
        expected = getattr(qmodel, "input_shape", None)
        if isinstance(x, torch.Tensor) and expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise InputDataError(f"training inputs have shape {tuple(x.shape)}, but the model was calibrated on inputs "
                                 f"of shape (batch, {', '.join(map(str, expected))}): give batches of that shape") from exc
        raise
