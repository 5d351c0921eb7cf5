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

import contextlib
import math
import numbers
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hessq._checks import check_inputs, check_int, check_model, check_number, model_float_dtype
from hessq._errors import ArtifactError, ConfigError, ConfigTypeError, HessqRuntimeError, InputDataError, ModelError
from hessq._io import digest, load_sealed_torch, save_sealed_torch
from hessq._utils import model_device, training_mode

FORMAT = "hessq.distilled-data"
VERSION = 1
_WHAT = "distilled-data set"
_REMEDY = "distil the inputs again (hessq.distill_data(...).save(path) or `hessq distill -o PATH`)"
# Seeds are mixed with the batch index into one torch generator seed, which must fit in 64 bits.
_MAX_SEED = 2**40


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d/2d/3d) with running statistics, by module path."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def _no_batchnorm_error(model: nn.Module) -> ModelError:
    return ModelError(
        f"distill_data needs BatchNorm statistics, and {type(model).__name__} has no BatchNorm layer with running "
        "statistics: ZeroQ synthesises inputs by matching the per-channel mean and standard deviation at each "
        "BatchNorm's input to its running_mean and running_var. Calibrate with real data instead (a few dozen "
        "unlabelled inputs are enough, e.g. hessq.quantize(model, plan, [x_real])), or, as a last resort, with "
        "Gaussian noise (hessq.quantize(model, plan, [torch.randn(32, *input_shape)]); ranges from noise are "
        "usually poor)."
    )


def _seed(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if abs(value) > _MAX_SEED:
        raise ConfigError(f"{name} must lie within ±2**40, got {value}")
    return int(value)


def _input_shape(input_shape: Any) -> tuple[int, ...]:
    example = "one sample without the batch dimension, e.g. (1, 28, 28) or (3, 224, 224)"
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise ConfigTypeError(f"input_shape must be a sequence of ints ({example}), got {input_shape!r}")
    if not input_shape or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in input_shape):
        raise ConfigTypeError(f"input_shape must be a non-empty sequence of ints ({example}), got {input_shape!r}")
    if any(s < 1 for s in input_shape):
        raise ConfigError(f"input_shape must hold positive sizes ({example}), got {tuple(input_shape)!r}")
    return tuple(int(s) for s in input_shape)


def _input_range(input_range: Any) -> tuple[float, float] | None:
    if input_range is None:
        return None
    if (isinstance(input_range, (str, bytes)) or not isinstance(input_range, Sequence) or len(input_range) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in input_range)):
        raise ConfigTypeError(f"input_range must be a (low, high) pair of numbers, e.g. (-1.0, 1.0), got {input_range!r}")
    lo, hi = (float(v) for v in input_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"input_range must be (low, high) with finite low < high, got {tuple(input_range)!r}")
    return lo, hi


@contextlib.contextmanager
def _deterministic_kernels(device: torch.device) -> Iterator[None]:
    """cuDNN's deterministic convolutions for the run (on CPU torch's kernels are deterministic already).

    What cannot be made bit-identical across CPUs: float reductions (the sums inside
    convolutions and their input gradients, the batch means and variances) are ordered
    differently by the AVX2 and AVX512 code paths of torch and oneDNN, and by GPUs. One step
    differs in the last bits; hundreds of Adam steps on the pixels amplify that into visibly
    different inputs (ResNet-20, seed 0, 200 steps: pixel sums -885 on AVX512, -464 with
    ATEN_CPU_CAPABILITY=avx2), of the same quality. So the same seed gives the same inputs on
    the same kind of machine and torch build (1 and 2 threads gave identical inputs); tests
    assert properties of the result, not its bits.
    """
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


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

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, torch.Tensor):
            raise ConfigTypeError(f"DistilledData inputs must be a tensor of shape (num_samples, *input_shape), got "
                                  f"{type(self.inputs).__name__}")
        if not self.inputs.is_floating_point() or self.inputs.dim() < 2 or len(self.inputs) == 0:
            raise InputDataError(f"DistilledData inputs must be a float tensor of shape (num_samples >= 1, "
                                 f"*input_shape), got {self.inputs.dtype} of shape {tuple(self.inputs.shape)}")
        if not torch.isfinite(self.inputs).all():
            raise InputDataError(f"DistilledData inputs hold NaN or infinite values "
                                 f"({int((~torch.isfinite(self.inputs)).sum())} of {self.inputs.numel()}); distil again "
                                 "with a smaller lr")
        self.batch_size = check_int(self.batch_size, "DistilledData batch_size", low=1)
        self.steps = check_int(self.steps, "DistilledData steps", low=0)
        self.seed = _seed(self.seed, "DistilledData seed")
        self.num_bn_layers = check_int(self.num_bn_layers, "DistilledData num_bn_layers", low=0)
        self.lr = check_number(self.lr, "DistilledData lr", low=0.0, strict=True)
        for name in ("loss", "initial_loss", "seconds"):
            setattr(self, name, check_number(getattr(self, name), f"DistilledData {name}", low=0.0))
        if not isinstance(self.batch_losses, (list, tuple)):
            raise ConfigTypeError(f"DistilledData batch_losses must be a list of numbers, got "
                                  f"{type(self.batch_losses).__name__}")
        self.batch_losses = [check_number(v, "DistilledData batch_losses[]", low=0.0)
                             for v in self.batch_losses]
        if not isinstance(self.meta, Mapping):
            raise ConfigTypeError(f"DistilledData meta must be a dict, got {type(self.meta).__name__}")
        self.meta = dict(self.meta)

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
        bs = self.batch_size if batch_size is None else check_int(batch_size, "batch_size", low=1)
        return list(torch.split(self.inputs, bs))

    @torch.no_grad()
    def labelled(self, model: nn.Module, batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) batches whose targets are ``model``'s own top-1 predictions.

        Distilled data has no labels; for a loss-based analysis (e.g. the Hessian
        sensitivity) the FP32 model's outputs serve as targets. ``model`` must be a
        classifier returning (batch, classes) logits for these inputs.
        """
        check_model(model)
        batches = self.batches(batch_size)
        check_inputs(self.inputs, model, where="distilled inputs")
        device = model_device(model)
        out = []
        with training_mode(model, False):
            for x in batches:
                try:
                    logits = model(x.to(device))
                except Exception as exc:  # a shape mismatch surfaces as RuntimeError, ValueError, IndexError, ...
                    raise InputDataError(
                        f"distilled inputs of shape {tuple(self.inputs.shape[1:])} (one sample) do not fit "
                        f"{type(model).__name__}: a forward pass on a batch of shape {tuple(x.shape)} fails with "
                        f"{type(exc).__name__}: {exc}. Distil inputs for this model's input shape"
                    ) from exc
                if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(logits) == len(x)):
                    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise ModelError(f"labelled needs a classifier returning (batch, classes) logits; "
                                     f"{type(model).__name__} returns {got} for a batch of {len(x)}")
                out.append((x, logits.argmax(1).cpu()))
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

    _FIELDS = ("loss", "initial_loss", "batch_losses", "steps", "lr", "batch_size", "seed", "seconds", "num_bn_layers")

    def save(self, path: str | os.PathLike) -> None:
        """Save inputs and figures to a sealed ``.pt`` file: format, version and a checksum of the rest.

        Written to a temporary file, then renamed. ``meta`` may hold only tensors, strings,
        numbers, None and lists/dicts of them (what a file can hold without pickled code).
        """
        try:
            digest(self.meta)
        except TypeError as exc:
            raise ConfigTypeError(f"DistilledData.meta cannot be saved ({exc}): keep only tensors, strings, numbers, None "
                                  "and lists/dicts of them") from None
        content = {"format": FORMAT, "version": VERSION, "inputs": self.inputs.detach().cpu(),
                   **{name: getattr(self, name) for name in self._FIELDS}, "meta": dict(self.meta)}
        save_sealed_torch(path, content)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DistilledData":
        """Read a file written by :meth:`save` (or ``hessq distill``).

        A damaged, truncated, foreign, checksum-less or newer-version file is refused with an
        :class:`hessq.ArtifactError` naming it; loading never runs pickled code.
        """
        data = load_sealed_torch(path, kind=FORMAT, versions=(VERSION,), what=_WHAT, remedy=_REMEDY)
        missing = [k for k in ("inputs", *cls._FIELDS, "meta") if k not in data]
        if missing:
            raise ArtifactError(f"{path} is not a complete {_WHAT} (no {', '.join(missing)}); {_REMEDY}")
        try:
            return cls(inputs=data["inputs"], **{k: data[k] for k in cls._FIELDS}, meta=data["meta"])
        except (ConfigError, InputDataError) as exc:
            raise ArtifactError(f"{path} holds unusable distilled data ({exc}); {_REMEDY}") from None


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

    The same arguments give the same inputs on the same kind of machine: the noise and the
    target classes come from a generator seeded by ``seed`` alone (the global RNG is neither
    read nor advanced); see :func:`_deterministic_kernels` for what differs across CPUs.

    Returns a :class:`DistilledData` (iterable as calibration batches) with the final
    statistics loss. Every argument is checked before the first forward pass: a bad value is a
    :class:`hessq.ConfigError`, an unusable model (not a Module, meta tensors, NaN weights, no
    BatchNorm with running statistics) a :class:`hessq.ModelError`, an ``input_shape`` that
    does not fit the model a ConfigError saying so.
    """
    # Every argument is checked before the first forward pass.
    check_model(model)
    num_samples = check_int(num_samples, "num_samples", low=1)
    batch_size = check_int(batch_size, "batch_size", low=1)
    steps = check_int(steps, "steps", low=0)
    lr = check_number(lr, "lr", low=0.0, strict=True)
    label_weight = check_number(label_weight, "label_weight", low=0.0)
    seed = _seed(seed, "seed")
    shape = _input_shape(input_shape)
    bounds = _input_range(input_range)

    bns = batchnorm_layers(model)
    if not bns:
        raise _no_batchnorm_error(model)
    device = model_device(model)
    dtype = model_float_dtype(model)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grad_flags:
        p.requires_grad_(False)
    hooks = _StatsHooks(bns)
    start = time.perf_counter()
    try:
        with _deterministic_kernels(device), training_mode(model, False):
            # Does the shape fit? One small forward pass, with the error translated.
            try:
                with torch.no_grad():
                    probe = model(torch.zeros((min(2, batch_size), *shape), device=device, dtype=dtype))
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
                # The start and the target classes come from a CPU generator of their own (never the global RNG,
                # never a device generator), so they are the same on every machine and for every device.
                gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
                x = torch.randn((n, *shape), generator=gen).to(device=device, dtype=dtype)
                if bounds is not None:
                    x = x.clamp(*bounds)
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
                    if bounds is not None:
                        with torch.no_grad():
                            x.clamp_(*bounds)
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
    weights = [n / num_samples for n in sizes]
    return DistilledData(
        inputs=torch.cat(outputs).cpu(),
        loss=sum(w * f for w, f in zip(weights, finals)),
        initial_loss=sum(w * f for w, f in zip(weights, initials)),
        batch_losses=finals,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        seconds=time.perf_counter() - start,
        num_bn_layers=used,
        meta={"model": type(model).__name__, "input_range": list(bounds) if bounds is not None else None,
              "label_weight": float(label_weight),
              **({"targets": torch.cat(all_targets).tolist()} if label_weight > 0 else {})},
    )


@torch.no_grad()
def statistics_loss(model: nn.Module, inputs: torch.Tensor) -> float:
    """The ZeroQ statistics loss L(x) of ``inputs`` (one batch) under ``model``'s BatchNorm layers.

    Useful to compare distilled data with real data or noise (lower is closer to what
    the BatchNorm layers saw in training).
    """
    check_model(model)
    if not isinstance(inputs, torch.Tensor):
        raise InputDataError(f"statistics_loss takes one batch as a tensor, got {type(inputs).__name__}")
    check_inputs(inputs, model)
    bns = batchnorm_layers(model)
    if not bns:
        raise _no_batchnorm_error(model)
    hooks = _StatsHooks(bns)
    try:
        with training_mode(model, False):
            model(inputs.to(model_device(model)))
        return float(hooks.pop_loss())
    finally:
        hooks.remove()
