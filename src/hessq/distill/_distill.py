"""ZeroQ distilled data: inputs whose batch statistics at every BatchNorm match its running statistics.

For each batch, start from Gaussian noise x and minimise, with Adam on the pixels,

    L(x) = Σ_BN  mean_c (μ̃_c(x) − μ_c)² + mean_c (σ̃_c(x) − σ_c)²

where μ̃_c, σ̃_c are the per-channel mean and standard deviation of the BatchNorm's
*input* over the batch (and spatial positions), and μ_c, σ_c = sqrt(running_var + eps)
the BatchNorm's running statistics. The statistics are taken by hooks on the BatchNorm
modules themselves, so the matching never depends on module order or position.

With ``label_weight`` = λ > 0 each sample also gets a random target class t (seeded) and
the loss becomes L(x) + λ · CE(f(x), t), as in DeepInversion / GDFQ: BatchNorm statistics
alone leave the last layers' activations weaker than real images give (no sample looks
like any class), which shrinks the calibrated ranges there.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hessq._errors import ConfigError, ConfigTypeError, HessqRuntimeError
from hessq._io import write_atomic

FORMAT = "hessq.distilled"


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d/2d/3d) with running statistics, by module path."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def _no_batchnorm_error(model: nn.Module) -> ValueError:
    return ValueError(
        f"distill_data needs BatchNorm statistics, and {type(model).__name__} has no BatchNorm layer with running "
        "statistics: ZeroQ synthesises inputs by matching the per-channel mean and standard deviation at each "
        "BatchNorm's input to its running_mean and running_var. Calibrate with real data instead (a few dozen "
        "unlabelled inputs are enough, e.g. hessq.quantize(model, plan, [x_real])), or, as a last resort, with "
        "Gaussian noise (hessq.quantize(model, plan, [torch.randn(32, *input_shape)]); ranges from noise are "
        "usually poor)."
    )


@dataclass
class DistilledData:
    """Distilled inputs and how well they match the BatchNorm statistics.

    ``inputs`` has shape (num_samples, *input_shape). ``loss`` is the final statistics
    loss (mean over batches of L(x) above) and ``initial_loss`` the loss of the starting
    noise; ``batch_losses`` the final loss of each batch. Iterating gives batches of
    ``batch_size`` inputs, so a DistilledData can be passed wherever hessq takes
    calibration batches (``hessq.quantize(model, 8, distilled)``).
    """

    inputs: torch.Tensor
    loss: float
    initial_loss: float
    batch_losses: list[float]
    steps: int
    lr: float
    batch_size: int
    seed: int
    seconds: float
    num_bn_layers: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of batches of ``batch_size``."""
        return math.ceil(len(self.inputs) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches())

    @property
    def num_samples(self) -> int:
        return len(self.inputs)

    def batches(self, batch_size: int | None = None) -> list[torch.Tensor]:
        """The inputs in batches of ``batch_size`` (default: the batch size they were distilled in)."""
        bs = batch_size or self.batch_size
        return list(torch.split(self.inputs, bs))

    @torch.no_grad()
    def labelled(self, model: nn.Module, batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) batches whose targets are ``model``'s own top-1 predictions.

        Distilled data has no labels; for a loss-based analysis (e.g. the Hessian
        sensitivity) the FP32 model's outputs serve as targets.
        """
        was_training = model.training
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            out = [(x, model(x.to(device)).argmax(1).cpu()) for x in self.batches(batch_size)]
        finally:
            model.train(was_training)
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "input_shape": list(self.inputs.shape[1:]),
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_bn_layers": self.num_bn_layers,
            "initial_loss": self.initial_loss,
            "loss": self.loss,
            "batch_losses": self.batch_losses,
            "seconds": self.seconds,
            **self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Save inputs and figures to a ``.pt`` file (written to a temporary file, then renamed)."""
        payload = {"format": FORMAT, "inputs": self.inputs.detach().cpu(), **self.summary()}
        write_atomic(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DistilledData":
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a hessq distilled-data file (written by DistilledData.save / `hessq distill`)")
        known = {"inputs", "loss", "initial_loss", "batch_losses", "steps", "lr", "batch_size", "seed", "seconds", "num_bn_layers"}
        meta = {k: v for k, v in data.items() if k not in known | {"format", "num_samples", "input_shape"}}
        return cls(**{k: data[k] for k in known}, meta=meta)


class _StatsHooks:
    """Forward pre-hooks on BatchNorm modules collecting the statistics loss of their inputs."""

    def __init__(self, bns: dict[str, nn.modules.batchnorm._BatchNorm]) -> None:
        self.terms: list[torch.Tensor] = []
        self.seen: set[str] = set()
        self.handles = [bn.register_forward_pre_hook(self._hook(name, bn)) for name, bn in bns.items()]

    def _hook(self, name: str, bn: nn.modules.batchnorm._BatchNorm):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            dims = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dims)
            std = torch.sqrt(x.var(dims, unbiased=False) + bn.eps)
            target_std = torch.sqrt(bn.running_var + bn.eps)
            self.terms.append(((mean - bn.running_mean) ** 2).mean() + ((std - target_std) ** 2).mean())
            self.seen.add(name)

        return hook

    def pop_loss(self) -> torch.Tensor:
        loss = torch.stack(self.terms).sum()
        self.terms = []
        return loss

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def distill_data(
    model: nn.Module,
    num_samples: int,
    input_shape: Sequence[int],
    *,
    steps: int = 500,
    lr: float = 0.5,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    input_range: tuple[float, float] | None = None,
    label_weight: float = 0.0,
) -> DistilledData:
    """ZeroQ: synthesise ``num_samples`` inputs of shape ``input_shape`` (one sample, no batch dimension).

    Each batch of ``batch_size`` starts as N(0, 1) noise (seeded by ``seed`` and the batch
    index) and is optimised for ``steps`` Adam steps at learning rate ``lr`` (halved on
    plateaus) so that, at every BatchNorm layer, the per-channel batch mean and standard
    deviation of the BN's input match its running statistics. The model's weights are
    untouched and it is run in eval mode.

    ``input_range`` = (low, high), the range of valid (preprocessed) inputs, e.g.
    ``(-127/128, 1.0)`` for EfficientNet-Lite's (px − 127)/128: the pixels start and stay
    inside it (projected after every step), so activation ranges calibrated on them are
    not stretched by impossible pixel values.

    ``label_weight`` > 0 adds that weight times the cross-entropy of the model's output
    against a random target class per sample (the model must return (N, classes) logits;
    the classes drawn are kept in ``meta["targets"]``); ``loss`` still reports the
    statistics loss alone.

    Returns a :class:`DistilledData` (iterable as calibration batches) with the final
    statistics loss. Raises ValueError if the model has no BatchNorm with running
    statistics or if ``input_shape`` does not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if int(num_samples) < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if int(steps) < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if not (math.isfinite(label_weight) and label_weight >= 0):
        raise ConfigError(f"label_weight must be a finite number >= 0, got {label_weight}")
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ConfigError(f"input_shape must be a sequence of ints (one sample, e.g. (3, 224, 224)), got {input_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"input_shape must be positive sizes of one sample (e.g. (3, 224, 224)), got {input_shape!r}")
    num_samples, batch_size, steps = int(num_samples), int(batch_size), int(steps)
    if input_range is not None:
        lo, hi = (float(v) for v in input_range)
        if not lo < hi:
            raise ConfigError(f"input_range must be (low, high) with low < high, got {input_range!r}")

    bns = batchnorm_layers(model)
    if not bns:
        raise _no_batchnorm_error(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grad_flags:
        p.requires_grad_(False)
    hooks = _StatsHooks(bns)
    start = time.perf_counter()
    try:
        # Does the shape fit? One small forward pass, with the error translated.
        try:
            with torch.no_grad():
                probe = model(torch.zeros((min(2, batch_size), *shape), device=device))
        except Exception as exc:  # any shape mismatch: RuntimeError, ValueError, IndexError, ...
            raise ConfigError(
                f"input_shape {shape} does not fit {type(model).__name__}: a forward pass on a batch of shape "
                f"{(min(2, batch_size), *shape)} fails with {type(exc).__name__}: {exc}. input_shape is the shape of "
                "one sample without the batch dimension, e.g. (1, 28, 28) for Fashion-MNIST or (3, 224, 224) for ImageNet."
            ) from exc
        if not hooks.seen:
            raise _no_batchnorm_error(model)
        if label_weight > 0 and not (isinstance(probe, torch.Tensor) and probe.dim() == 2 and probe.shape[1] > 1):
            raise ConfigError(
                f"label_weight > 0 needs a classifier returning (batch, classes) logits; {type(model).__name__} returns "
                f"{tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__}. Pass label_weight=0."
            )
        num_classes = int(probe.shape[1]) if label_weight > 0 else 0
        hooks.terms = []
        used = len(hooks.seen)

        outputs, finals, initials, all_targets = [], [], [], []
        sizes = [min(batch_size, num_samples - s) for s in range(0, num_samples, batch_size)]
        bar = tqdm(total=len(sizes) * steps, desc="distill", disable=not progress, leave=False)
        for index, n in enumerate(sizes):
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
            x = torch.randn((n, *shape), generator=gen).to(device)
            if input_range is not None:
                x = x.clamp(lo, hi)
            x.requires_grad_(True)
            targets = torch.randint(0, num_classes, (n,), generator=gen).to(device) if label_weight > 0 else None
            optimizer = torch.optim.Adam([x], lr=lr)
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=50, min_lr=1e-4)
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                out = model(x)
                loss = hooks.pop_loss()
                value = float(loss.detach())
                if step == 0:
                    initials.append(value)
                if label_weight > 0:
                    loss = loss + label_weight * nn.functional.cross_entropy(out, targets)
                loss.backward()
                optimizer.step()
                if input_range is not None:
                    with torch.no_grad():
                        x.clamp_(lo, hi)
                scheduler.step(float(loss.detach()))
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(batch=index, loss=f"{value:.4g}")
            with torch.no_grad():
                model(x)
                final = float(hooks.pop_loss())
            if steps == 0:
                initials.append(final)
            if not math.isfinite(final):
                raise HessqRuntimeError(
                    f"distillation diverged (statistics loss {final}) in batch {index}; try a smaller lr (got {lr})"
                )
            finals.append(final)
            outputs.append(x.detach())
            if targets is not None:
                all_targets.append(targets.cpu())
        bar.close()
    finally:
        hooks.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    weights = [n / num_samples for n in sizes]
    return DistilledData(
        inputs=torch.cat(outputs).cpu(),
        loss=sum(w * f for w, f in zip(weights, finals)),
        initial_loss=sum(w * f for w, f in zip(weights, initials)),
        batch_losses=finals,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=int(seed),
        seconds=time.perf_counter() - start,
        num_bn_layers=used,
        meta={"model": type(model).__name__, "input_range": list(input_range) if input_range is not None else None,
              "label_weight": float(label_weight),
              **({"targets": torch.cat(all_targets).tolist()} if label_weight > 0 else {})},
    )


@torch.no_grad()
def statistics_loss(model: nn.Module, inputs: torch.Tensor) -> float:
    """The ZeroQ statistics loss L(x) of ``inputs`` (one batch) under ``model``'s BatchNorm layers.

    Useful to compare distilled data with real data or noise (lower is closer to what
    the BatchNorm layers saw in training).
    """
    bns = batchnorm_layers(model)
    if not bns:
        raise _no_batchnorm_error(model)
    was_training = model.training
    model.eval()
    hooks = _StatsHooks(bns)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model(inputs.to(device))
        return float(hooks.pop_loss())
    finally:
        hooks.remove()
        model.train(was_training)
