"""Quantization-aware fine-tuning: straight-through gradients, optional distillation, resumable."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hessq._errors import ConfigError, HessqRuntimeError
from hessq._io import write_atomic

CHECKPOINT_FORMAT = "hessq.qat-checkpoint"
CHECKPOINT_VERSION = 1


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened outputs, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True) * t * t


def _load_checkpoint(path: Path, qmodel: nn.Module) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ConfigError(f"cannot read QAT checkpoint {path} ({exc}); it is truncated or not a checkpoint. Delete it to start over.") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a hessq QAT checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path} is QAT checkpoint version {state.get('version')}, this hessq reads {CHECKPOINT_VERSION}")
    ours, theirs = set(qmodel.state_dict()), set(state["model"])
    if ours != theirs:
        raise ConfigError(
            f"{path} holds a checkpoint of another quantized model (keys differ: {sorted(ours ^ theirs)[:4]}); "
            "quantize the same model with the same plan, or pass another checkpoint path"
        )
    return state


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

    ``checkpoint``: a file written (atomically) at the end of each epoch and every
    ``checkpoint_every`` steps; with ``resume`` an existing one is loaded and training
    continues where it stopped, giving the same weights as an uninterrupted run.
    ``max_steps`` stops early (an interruption: the schedule is still that of ``epochs``), counting steps
    already done.
    Returns the history: per-epoch mean loss and the number of steps done.
    """
    if not epochs > 0:
        raise ConfigError(f"epochs must be > 0, got {epochs}")
    if not 0.0 <= distill_weight <= 1.0:
        raise ConfigError(f"distill_weight must be in [0, 1], got {distill_weight}")
    if not hasattr(train_batches, "__len__"):
        train_batches = list(train_batches)
    steps_per_epoch = len(train_batches)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ConfigError("no training batches")
    total_steps = max(1, round(epochs * steps_per_epoch))  # a fractional epoch is a shorter schedule
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    device = next(p.device for p in qmodel.parameters())

    torch.manual_seed(seed)
    params = [p for p in qmodel.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    history: dict[str, Any] = {"epoch_loss": [], "steps": 0}
    step = 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and resume and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, qmodel)
        qmodel.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history = state["history"]
        step = state["step"]

    def save() -> None:
        if ckpt_path is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": qmodel.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": history,
            "step": step,
        }
        write_atomic(ckpt_path, lambda tmp: torch.save(state, tmp))

    if teacher is not None:
        teacher.eval()
    limit = min(total_steps, max_steps) if max_steps is not None else total_steps
    bar = tqdm(total=limit, initial=min(step, limit), desc="finetune", disable=not progress)
    try:
        while step < limit:
            epoch, skip = divmod(step, steps_per_epoch)
            if hasattr(train_batches, "set_epoch"):
                train_batches.set_epoch(epoch)
            qmodel.train()
            running = history.get("running", 0.0) if skip else 0.0
            for i, (x, y) in enumerate(train_batches):
                if i < skip:
                    continue  # resuming mid-epoch: these batches were already trained on
                if step >= limit:
                    break
                x, y = x.to(device), y.to(device)
                out = qmodel(x)
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
                if checkpoint_every and step % checkpoint_every == 0 and step % steps_per_epoch:
                    save()
            if step % steps_per_epoch == 0 or step >= limit:
                done = step - epoch * steps_per_epoch
                history["epoch_loss"].append(running / max(done, 1))
                history["running"] = 0.0
            save()
    finally:
        bar.close()
    qmodel.eval()
    return history
