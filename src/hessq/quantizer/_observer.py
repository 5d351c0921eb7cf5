"""Range observers: the min/max an activation quantizer's scale is computed from."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from hessq._distributed import LOCAL, extremes, gather_strided, gather_top_magnitudes, range_group
from hessq._errors import ConfigError
from hessq.quantizer._functional import fake_quantize

RangeMethod = Literal["minmax", "percentile", "ema", "mse"]
RANGE_METHODS = ("minmax", "percentile", "ema", "mse")

# torch.quantile refuses inputs above 16M elements; a strided subsample keeps it exact enough.
_QUANTILE_MAX = 1 << 24
# The mse method keeps a strided sample of every batch (at most this many values in all) to search its clip on.
_MSE_SAMPLES = 1 << 17
# ... and the values of largest magnitude of every batch, exactly: a transformer's few massive activations (a handful
# of tokens in one or two channels) fall between a stride's samples, and a clip searched without them cuts them off.
_MSE_EXTREMES = 256
# Candidate clips: these fractions of the largest magnitude seen.
_MSE_FRACTIONS = torch.linspace(0.1, 1.0, 46, dtype=torch.float64)


def _full_float(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (a float64 model's ranges keep its precision); anything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def percentile_bounds(x: torch.Tensor, percentile: float, max_samples: int = _QUANTILE_MAX,
                      group: object = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``100 - percentile`` and ``percentile`` quantiles of ``x``, on a strided subsample of at most
    ``max_samples`` values: the one clipping rule of calibration and of QAT's range tracking. With a process
    ``group``, ``x`` is this rank's consecutive part of a tensor split over the ranks, and the quantiles are
    the whole tensor's (see :func:`hessq._distributed.gather_strided`)."""
    flat = gather_strided(_full_float(x.detach().reshape(-1)), max_samples, group)
    q = torch.quantile(flat, torch.tensor([1 - percentile / 100, percentile / 100], device=flat.device, dtype=flat.dtype))
    return q[0], q[1]


def batch_range(x: torch.Tensor, percentile: float | None, max_samples: int = _QUANTILE_MAX, *,
                batch_constant: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) of one batch: its percentile bounds, or its extremes when ``percentile`` is None.

    Under :func:`hessq._distributed.synced_ranges` (QAT under torch.distributed) the batch is every rank's
    part of it together, so every rank gets the same range, the one a single process would on the whole batch.
    A ``batch_constant`` tensor (one that no input value reaches, such as BERT's position embeddings) is the same
    on every rank and is not a part of anything: its own range is the whole's.
    """
    group = LOCAL if batch_constant else range_group()
    if percentile is not None:
        return percentile_bounds(x, percentile, max_samples, group)
    return extremes(_full_float(x.detach().amin()), _full_float(x.detach().amax()), group)


def mse_clip(sample: torch.Tensor, qmax: int, signed: bool, weights: torch.Tensor | None = None,
             extremes: torch.Tensor | None = None) -> float:
    """The clip c minimising Σ w·(x − q(x))² over ``sample`` (each value standing for ``weights`` values, default
    1) and ``extremes`` (each itself), q the grid of step c/qmax on [−c, c] (``signed``) or [0, c]: the bound that
    trades rounding error against clipping error, searched over fractions 0.1–1 of the largest magnitude. With a
    few outlier channels (a transformer's LayerNorm outputs) a percentile sits in their tail and leaves everything
    else a few steps; the squared error weighs both."""
    x = sample.double()
    w = torch.ones_like(x) if weights is None else weights.double()
    if extremes is not None:
        x, w = torch.cat([x, extremes.double()]), torch.cat([w, torch.ones(extremes.numel(), dtype=torch.float64)])
    if x.numel() == 0:
        return 0.0
    top = float(x.abs().max() if signed else x.clamp(min=0).max())
    if top == 0.0:
        return 0.0
    clips = top * _MSE_FRACTIONS
    qmin = -qmax if signed else 0
    errors = torch.stack([(w * (fake_quantize(x, c / qmax, qmin, qmax) - x) ** 2).sum() for c in clips])
    return float(clips[int(errors.argmin())])


class RangeObserver(nn.Module):
    """Tracks the (min, max) of the tensors it sees.

    ``minmax``: the running extremes. ``percentile``: the mean over batches of each
    batch's ``percentile`` and ``100 - percentile`` quantiles (robust to outliers).
    ``ema``: an exponential moving average of each batch's extremes with ``momentum``.
    ``mse``: the extremes, each batch's values of largest magnitude and a strided sample of the rest, on which the
    quantizer searches the clip of least squared error for its bits (:func:`mse_clip`) when it freezes.
    """

    def __init__(self, method: RangeMethod = "minmax", percentile: float = 99.99, momentum: float = 0.9) -> None:
        super().__init__()
        if method not in RANGE_METHODS:
            raise ConfigError(f"range method must be one of {RANGE_METHODS}, got {method!r}")
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
        self.method = method
        self.percentile = percentile
        self.momentum = momentum
        # set by the rewrite for a value no input reaches (BERT's position embeddings): under DDP it is the same
        # on every rank, so its range is its own, not synced as a part of the global batch
        self.batch_constant = False
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.long))
        # mse: not state (a frozen scale is), so not buffers
        self.samples: list[torch.Tensor] = []
        self.sample_weights: list[float] = []
        self.extremes: list[torch.Tensor] = []

    def reset(self) -> None:
        self.samples, self.sample_weights, self.extremes = [], [], []
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.num_batches.zero_()

    @property
    def initialized(self) -> bool:
        return bool(self.num_batches > 0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if not torch.isfinite(x).all():
            raise ConfigError("NaN or inf in an activation being calibrated; check the model and its inputs")
        lo, hi = batch_range(x, self.percentile if self.method == "percentile" else None,
                             batch_constant=self.batch_constant)
        if self.method == "mse":
            self._sample(_full_float(x.reshape(-1)))
        n = int(self.num_batches)
        if n == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        elif self.method in ("minmax", "mse"):
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
        elif self.method == "percentile":
            self.min_val.copy_((self.min_val * n + lo) / (n + 1))
            self.max_val.copy_((self.max_val * n + hi) / (n + 1))
        else:
            self.min_val.copy_(self.momentum * self.min_val + (1 - self.momentum) * lo)
            self.max_val.copy_(self.momentum * self.max_val + (1 - self.momentum) * hi)
        self.num_batches += 1
        return x

    def _sample(self, flat: torch.Tensor) -> None:
        """Keep a batch's largest-magnitude values exactly and a strided sample of the rest, each sampled value
        standing for as many values as the stride skips (a stratified estimate of the squared error)."""
        group = LOCAL if self.batch_constant else range_group()
        top, total = gather_top_magnitudes(flat, _MSE_EXTREMES, group)
        sample = gather_strided(flat, _MSE_SAMPLES // 8, group)
        # the sampled values at or above the smallest kept extreme are counted among the extremes already; the
        # rest stand for the batch's other values, so their weights sum to the count of values not kept exactly
        below = sample.abs() < top.abs().min() if top.numel() else torch.ones_like(sample, dtype=torch.bool)
        kept = sample[below]
        self.samples.append(kept.cpu())
        self.sample_weights.append((total - top.numel()) / max(kept.numel(), 1))
        self.extremes.append(top.cpu())
        if sum(t.numel() for t in self.samples) > _MSE_SAMPLES:  # keep every other value: the sample stays spread
            self.sample_weights = [w * t.numel() / max(t[::2].numel(), 1)
                                   for t, w in zip(self.samples, self.sample_weights)]
            self.samples = [t[::2] for t in self.samples]

    def mse_range(self, qmax: int, signed: bool) -> tuple[float, float]:
        """(low, high) clipped for least squared error on the sampled values and the extremes (``mse``)."""
        if not self.samples:
            c = float(self.max_val)
        else:
            weights = torch.cat([torch.full((t.numel(),), w, dtype=torch.float64)
                                 for t, w in zip(self.samples, self.sample_weights)])
            c = mse_clip(torch.cat(self.samples), qmax, signed, weights, torch.cat(self.extremes))
        return (-c, c) if signed else (0.0, c)

    def extra_repr(self) -> str:
        return f"method={self.method}, min={float(self.min_val):.4g}, max={float(self.max_val):.4g}"
