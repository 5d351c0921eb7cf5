"""The cost model (size, BOPs, latency per layer and bit width) and the perturbation Ω."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hessq._checks import check_model, model_float_dtype
from hessq._utils import model_device, training_mode
from hessq._errors import ConfigError, ConfigTypeError, ModelError
from hessq.graph import CapturedModel, capture, quantizable_layers
from hessq.ops import family_of_module
from hessq.plan._files import SealedJSONFile, mapping_or_empty, real_number, required
from hessq.quantizer import check_act_bits, check_weight_bits
from hessq.sensitivity import Sensitivity

#: Bytes of one per-output-channel scale (float32) and of one int32 bias entry.
SCALE_BYTES = 4
BIAS_BYTES = 4

LATENCY_FORMAT = "hessq.latency"
#: 1: sealed (sha256). Earlier files had no version and no checksum and are refused.
LATENCY_VERSION = 1

#: Non-positive sensitivities are replaced by this fraction of the largest |sensitivity|.
NEGATIVE_FLOOR = 1e-9
#: Standard errors added to each estimated trace before planning (about a 98% one-sided upper bound).
STDERR_MARGIN = 2.0


def check_stderr_margin(margin: Any) -> float:
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin) or margin < 0:
        raise ConfigError(f"stderr_margin must be a number >= 0 (standard errors added to each trace), got {margin!r}")
    return float(margin)

Variant = Literal["trace", "eigenvalue"]
#: How a curvature's sign enters Ω: "signed" (HAWQ: a negative trace predicts that quantization lowers the loss, so
#: the layer counts as least sensitive) or "magnitude" (|Tr(H_i)|, as Q-BERT takes |mean λ|: curvature of either
#: sign moves the loss, and the quadratic's predicted fall does not hold at the step sizes of 2–3 bits).
Curvature = Literal["signed", "magnitude"]
CURVATURES = ("signed", "magnitude")


def check_curvature(curvature: Any) -> str:
    if curvature not in CURVATURES:
        raise ConfigError(f"curvature must be one of {', '.join(map(repr, CURVATURES))}, got {curvature!r}")
    return curvature


def curvature_bound(value: float, stderr: float, margin: float, curvature: str) -> float:
    """A trace (or eigenvalue) as the planner takes it: its magnitude if asked, plus ``margin`` standard errors."""
    stderr = stderr if math.isfinite(stderr) else 0.0
    return (abs(value) if curvature == "magnitude" else value) + margin * stderr


@dataclass(frozen=True)
class LayerCost:
    """What one quantizable layer costs, as a function of its weight bit width.

    ``num_params`` is n_i (weight elements), ``macs`` the multiply-accumulates of one forward
    pass on the example input (batch of one), ``has_bias`` whether the deployed layer stores an
    int32 bias (its own bias, or one folded from the BatchNorm that follows it).
    """

    name: str
    kind: str
    num_params: int
    out_channels: int
    has_bias: bool
    macs: int
    #: Bytes of weights inside the layer that its bits do not set (a deformable conv's 8-bit offset branch).
    fixed_bytes: int = 0

    def size_bytes(self, bits: int) -> int:
        """Weights packed at ``bits`` bits (rounded up to whole bytes), int32 bias, float32 scale per channel,
        plus the layer's fixed-width parts."""
        weights = math.ceil(self.num_params * bits / 8)
        bias = self.out_channels * BIAS_BYTES if self.has_bias else 0
        return weights + bias + self.out_channels * SCALE_BYTES + self.fixed_bytes

    def bops(self, bits: int, act_bits: int = 8) -> int:
        """Bit operations: MACs × weight bits × activation bits (HAWQ-V3)."""
        return self.macs * bits * act_bits


def _latency_bits(bits: Any, name: str) -> int:
    """A bit width key: an int, or its decimal string (JSON keys are strings); 4.5 or "four" are refused."""
    if isinstance(bits, str) and bits.strip().isdigit():
        return int(bits)
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool):
        return int(bits)
    raise ConfigError(f"latency table entry {name!r}: bit width {bits!r} is not a whole number of bits")


class LatencyTable(SealedJSONFile, Mapping[str, Mapping[int, float]]):
    """Measured latency in seconds: layer name -> weight bits -> seconds.

    Built from a plain mapping (``LatencyTable({"conv1": {4: 1.2e-5, 8: 2.0e-5}, ...})``); a plain
    mapping may also be passed wherever a table is taken (``latency_table=``). Its file
    (latency.json, from :meth:`save` or ``hessq export --latency-table``) is sealed JSON:
    ``{"format": "hessq.latency", "version": 1, "layers": {"conv1": {"4": 1.2e-5, ...}}, "meta": {...},
    "sha256": ...}``; a file that is damaged, unsealed or of another kind or version is refused.
    """

    FORMAT = LATENCY_FORMAT
    VERSION = LATENCY_VERSION
    WHAT = "latency table"
    REMEDY = "measure it again with hessq.integer.measure_latency_table or `hessq export --latency-table`"

    def __init__(self, layers: Mapping[str, Mapping[Any, float]], meta: Mapping[str, Any] | None = None) -> None:
        if not isinstance(layers, Mapping):
            raise ConfigTypeError(f"a latency table maps layer names to {{bits: seconds}}, got {type(layers).__name__}")
        table: dict[str, dict[int, float]] = {}
        for name, row in layers.items():
            if not isinstance(row, Mapping):
                raise ConfigError(f"latency table entry for {name!r} must map bit widths to seconds, got {row!r}")
            parsed: dict[int, float] = {}
            for bits, seconds in row.items():
                b = _latency_bits(bits, name)
                s = real_number(seconds, f"latency table entry {name!r} at {b} bits")
                if s < 0:
                    raise ConfigError(f"latency table entry {name!r} at {b} bits: {seconds!r} is not a time in seconds")
                parsed[b] = s
            table[str(name)] = parsed
        self._layers = table
        self.meta = dict(mapping_or_empty(meta, "a latency table's meta"))

    def __getitem__(self, name: str) -> Mapping[int, float]:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LatencyTable):
            return self._layers == other._layers and self.meta == other.meta
        return super().__eq__(other)

    __hash__ = None  # compare by value

    def seconds(self, name: str, bits: int) -> float:
        if name not in self._layers:
            raise ConfigError(f"the latency table has no entry for layer {name!r} (it has {len(self._layers)} layers)")
        row = self._layers[name]
        if bits not in row:
            raise ConfigError(
                f"the latency table has no time for layer {name!r} at {bits} bits (it has {sorted(row)}); "
                "measure it or drop that bit width"
            )
        return row[bits]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LATENCY_FORMAT,
            "version": LATENCY_VERSION,
            "meta": self.meta,
            "layers": {n: {str(b): s for b, s in row.items()} for n, row in self._layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyTable":
        """A table from :meth:`to_dict`'s form (with its format and version); for a bare
        ``{layer: {bits: seconds}}`` mapping use ``LatencyTable(mapping)``."""
        if isinstance(data, Mapping) and "format" not in data:
            raise ConfigError("not a hessq latency table (no 'format'): for a bare {layer: {bits: seconds}} mapping "
                              "use LatencyTable(mapping)")
        data = cls.check_kind(data)
        return cls(required(data, "layers", "the latency table"), data.get("meta"))


def as_latency_table(table: "LatencyTable | Mapping | str | os.PathLike | None") -> LatencyTable | None:
    """A LatencyTable from a table, a plain ``{layer: {bits: seconds}}`` mapping (or :meth:`LatencyTable.to_dict`'s
    form), or the path of a sealed latency.json."""
    if table is None or isinstance(table, LatencyTable):
        return table
    if isinstance(table, (str, os.PathLike)):
        return LatencyTable.load(table)
    if isinstance(table, Mapping):
        return LatencyTable.from_dict(table) if "format" in table else LatencyTable(table)
    raise ConfigTypeError(f"latency_table must be a LatencyTable, a mapping or a JSON path, got {type(table).__name__}")


#: Tokens per example input of a captured transformer when no input shape is given.
DEFAULT_SEQUENCE_LENGTH = 128


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """(T,) token ids for a captured transformer or a model whose first layer is a table (T = 128), (C, 28, 28) for a model whose first layer takes
    image channels (the bundled ResNet-20 is 1×28×28), else (in_features,)."""
    captured = capture(model)
    if isinstance(captured, CapturedModel):
        return (min(DEFAULT_SEQUENCE_LENGTH, captured.max_length),)
    first = next(iter(quantizable_layers(model).values()))
    if isinstance(first, nn.Embedding):  # a text model of its own: token ids
        return (DEFAULT_SEQUENCE_LENGTH,)
    if hasattr(first, "in_channels"):
        return (first.in_channels, 28, 28)
    return (first.in_features,)


def _example_input(model: nn.Module, example_input: torch.Tensor | None, input_shape: Sequence[int] | None) -> torch.Tensor:
    if example_input is not None and input_shape is not None:
        raise ConfigError("give example_input or input_shape, not both")
    if example_input is not None:
        return example_input
    shape = tuple(int(s) for s in (input_shape if input_shape is not None else default_input_shape(model)))
    if isinstance(capture(model), CapturedModel) or isinstance(next(iter(quantizable_layers(model).values())), nn.Embedding):
        # token ids: one real token everywhere, nothing masked
        return torch.ones((1, *shape), device=model_device(model), dtype=torch.long)
    return torch.zeros((1, *shape), device=model_device(model), dtype=model_float_dtype(model))


class _MatmulCounter(torch.overrides.TorchFunctionMode):
    """Counts the MACs of matmuls between two activations (attention's QKᵀ and A·V); weights' are the layers'."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.__matmul__) and len(args) == 2:
            a, b = args
            if not isinstance(a, nn.Parameter) and not isinstance(b, nn.Parameter) and isinstance(out, torch.Tensor):
                self.macs += out.numel() * a.shape[-1]
        return out


def activation_matmul_macs(model: nn.Module, *, example_input: torch.Tensor | None = None,
                           input_shape: Sequence[int] | None = None) -> int:
    """MACs (per example) of the matmuls whose both operands are activations: a fixed cost at the activation
    bits, which the plan adds to every assignment's BOPs."""
    model = capture(model)
    x = _example_input(model, example_input, input_shape)
    batch = x.shape[0] if x.dim() > 0 and x.shape[0] > 0 else 1
    counter = _MatmulCounter()
    with torch.no_grad(), training_mode(model, False), counter:
        model(x)
    return counter.macs // batch


def layer_costs(
    model: nn.Module,
    *,
    example_input: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    bias_layers: Iterable[str] | None = None,
) -> dict[str, LayerCost]:
    """The :class:`LayerCost` of every quantizable layer, in network order.

    MACs come from one forward pass with hooks: ``example_input`` as given (its batch size is
    divided out), or zeros of shape ``(1, *input_shape)``; the default shape is
    :func:`default_input_shape`. ``bias_layers`` names layers that store an int32 bias though
    their module has none (because a BatchNorm folds into them).
    """
    model = capture(model)
    layers = quantizable_layers(model)
    x = _example_input(model, example_input, input_shape)
    batch = x.shape[0] if x.dim() > 0 and x.shape[0] > 0 else 1
    macs = {name: 0 for name in layers}
    ran: set[str] = set()  # an embedding lookup runs with 0 MACs

    families = {name: family_of_module(m) for name, m in layers.items()}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            macs[name] += families[name].macs(module, inputs, output) // batch
            ran.add(name)

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in layers.items()]
    try:
        with torch.no_grad(), training_mode(model, False):
            model(x)
    except Exception as exc:
        raise ConfigError(
            f"could not run {type(model).__name__} on an example input of shape {tuple(x.shape)} to count MACs "
            f"({type(exc).__name__}: {exc}); pass example_input= or input_shape= (without the batch dimension)"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    unused = [n for n in macs if n not in ran]
    if unused:
        warnings.warn(f"layers never ran on the example input (counted as 0 MACs): {unused[:5]}", stacklevel=2)
    extra_bias = set(bias_layers or ())
    costs = {}
    for name, m in layers.items():
        costs[name] = LayerCost(
            name=name,
            kind=families[name].name,
            num_params=int(m.weight.numel()),
            out_channels=int(m.weight.shape[0]),
            has_bias=getattr(m, "bias", None) is not None or name in extra_bias,
            macs=int(macs[name]),
            fixed_bytes=_inner_weight_bytes(m),
        )
    return costs


def _inner_weight_bytes(layer: nn.Module) -> int:
    """Bytes of the weights of modules nested in a layer (stored at 8 bits, per-channel scale and int32 bias)."""
    total = 0
    for name, child in layer.named_modules():
        w = getattr(child, "weight", None)
        if name and isinstance(w, torch.Tensor) and w.dim() > 1:
            total += w.numel() + w.shape[0] * (SCALE_BYTES + (BIAS_BYTES if getattr(child, "bias", None) is not None else 0))
    return total


def check_bits_list(weight_bits: Iterable[int] | int) -> tuple[int, ...]:
    """Sorted weight bit widths, each an integer from 2 to 8, none twice."""
    if isinstance(weight_bits, int) and not isinstance(weight_bits, bool):
        weight_bits = (weight_bits,)
    if isinstance(weight_bits, (str, bytes)):
        raise ConfigTypeError(f"weight_bits must be bit widths like (4, 8), got the string {weight_bits!r}")
    try:
        bits = list(weight_bits)
    except TypeError:
        raise ConfigTypeError(f"weight_bits must be a bit width or a list of them, got {weight_bits!r}") from None
    if not bits:
        raise ConfigError("weight_bits is empty: give at least one candidate bit width from 2 to 8")
    for b in bits:
        check_weight_bits(b)
    twice = sorted({b for b in bits if bits.count(b) > 1})
    if twice:
        raise ConfigError(f"weight_bits lists {', '.join(map(str, twice))} more than once ({bits}); give each "
                          "candidate bit width once")
    return tuple(sorted(bits))


def perturbations(
    model: nn.Module,
    sens: Sensitivity,
    weight_bits: Iterable[int],
    *,
    variant: Variant = "trace",
    stderr_margin: float = STDERR_MARGIN,
    curvature: Curvature = "signed",
) -> dict[str, dict[int, float]]:
    """Ω_i(b) for every quantizable layer i and bit width b.

    ``variant="trace"`` (HAWQ-V2/V3): Ω_i(b) = ((Tr(H_i) + m·σ_i)/n_i)·‖Q_b(W_i) − W_i‖², σ_i the estimate's
    standard error and m = ``stderr_margin``: a layer counts as insensitive only when its trace is *measured* small.
    (At m = 0 a trace within noise of zero, or a negative estimate of one, sends the layer to the lowest width: on
    the tweets MiniLM, 32 Hutchinson samples put the 6 Linears whose estimates were negative at 2 bits.)
    ``variant="eigenvalue"`` (HAWQ): Ω_i(b) = (λ_i/n_i)·‖Q_b(W_i) − W_i‖², λ_i the top eigenvalue.
    ``curvature="magnitude"`` takes |Tr(H_i)| (or |λ_i|) in place of the signed value (see :data:`Curvature`).
    ‖Q_b(W_i) − W_i‖² is that of the layer family's own quantizer (an embedding table's rows clipped for least error).
    """
    model = capture(check_model(model))
    bits = check_bits_list(weight_bits)
    layers = quantizable_layers(model)
    factors = perturbation_factors(model, sens, layers, variant=variant, stderr_margin=stderr_margin,
                                   curvature=curvature)
    out: dict[str, dict[int, float]] = {}
    for name, m in layers.items():
        factor = factors[name]
        w = m.weight.detach()
        family = family_of_module(m)
        with _one_thread() if w.numel() < 1 << 20 else contextlib.nullcontext():
            # the family's own quantizer: an embedding table's rows are clipped for least error
            out[name] = {b: factor * family.weight_quantizer(b).squared_error(w) for b in bits}
    return out


def perturbation_factors(model: nn.Module, sens: Sensitivity, layers: Mapping[str, nn.Module], *,
                         variant: Variant = "trace", stderr_margin: float = STDERR_MARGIN,
                         curvature: Curvature = "signed") -> dict[str, float]:
    """Each layer's factor of ‖Q_b(W_i) − W_i‖² in Ω_i(b) (see :func:`perturbations`)."""
    check_sensitivity(model, sens, layers)
    if variant not in ("trace", "eigenvalue"):
        raise ConfigError(f"variant must be 'trace' or 'eigenvalue', got {variant!r}")
    margin = check_stderr_margin(stderr_margin)
    curvature = check_curvature(curvature)
    factors: dict[str, float] = {}
    for name in layers:
        rec = sens[name]
        if variant == "trace":
            factor = curvature_bound(rec.trace, rec.trace_stderr, margin, curvature) / rec.num_params
        else:
            if rec.top_eigenvalue is None:
                raise ConfigError(
                    f"the sensitivity has no top eigenvalue for layer {name!r}; compute eigenvalues "
                    "(hessian_sensitivity(..., eigenvalues=True)) or use variant='trace'"
                )
            factor = curvature_bound(rec.top_eigenvalue, 0.0, 0.0, curvature) / rec.num_params
        if not math.isfinite(factor):
            raise ConfigError(f"the sensitivity of layer {name!r} is not finite ({factor}); recompute it")
        factors[name] = factor
    # A negative trace (a noisy estimate, or a saddle) would make Ω reward quantization error.
    # Such layers get a tiny positive factor: least sensitive of all, yet still better at more bits.
    negative = [n for n, f in factors.items() if f <= 0]
    if negative:
        floor = NEGATIVE_FLOOR * max([abs(f) for f in factors.values()] + [1e-30])
        warnings.warn(
            f"{len(negative)} layer(s) have a non-positive {'trace' if variant == 'trace' else 'top eigenvalue'} "
            f"({negative[:4]}{' …' if len(negative) > 4 else ''}); treated as least sensitive "
            f"({floor:.3g} per weight). Estimate with more samples or data if that is unexpected.",
            stacklevel=3,
        )
        for n in negative:
            factors[n] = floor
    return factors


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run small tensor ops on one thread: on a busy machine, waking a thread pool for a few
    thousand elements can cost milliseconds per op (seen: 10 ms vs 1 µs for torch.round)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_sensitivity(model: nn.Module, sens: Sensitivity, layers: Mapping[str, nn.Module] | None = None) -> None:
    """Raise if ``sens`` belongs to another model or misses any of its quantizable layers."""
    if not isinstance(sens, Mapping):
        raise ConfigTypeError(f"sens must be a hessq Sensitivity (layer name -> LayerSensitivity), got {type(sens).__name__}")
    if hasattr(sens, "check_model"):
        sens.check_model(model)
    layers = layers if layers is not None else quantizable_layers(model)
    missing = [n for n in layers if n not in sens]
    if missing:
        raise ModelError(
            f"the sensitivity has no record for {len(missing)} quantizable layer(s) of this model, e.g. {missing[:5]}; "
            "it was computed for another model: compute it for this one"
        )
    for name, m in layers.items():
        if sens[name].num_params != m.weight.numel():
            raise ModelError(
                f"the sensitivity says layer {name!r} has {sens[name].num_params} weights but the model's has "
                f"{m.weight.numel()}: it was computed for another model: compute it for this one"
            )


def check_act(act_bits: int) -> int:
    return check_act_bits(act_bits)
