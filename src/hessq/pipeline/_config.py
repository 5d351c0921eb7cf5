"""The settings of each stage of :func:`hessq.compress`: small, frozen, versioned, and the one place their defaults live.

Every config checks its values when it is made, so a bad value is a :class:`hessq.ConfigError`
naming ``Class.field`` and the fix before any stage runs. ``to_dict()`` gives a JSON-ready dict with
its ``kind`` and ``version``; ``from_dict()`` reads one back and refuses unknown keys, another kind
or another version. The command line takes its defaults from these classes.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from hessq._checks import check_bool, check_int, check_number
from hessq._errors import ArtifactError, ConfigError, ConfigTypeError, HessqError
from hessq.distill import check_input_range
from hessq.plan import CURVATURES, LatencyTable, Relative, as_latency_table, check_bits_list, parse_limit
from hessq.quantizer import check_act_bits, check_weight_bits
from hessq.sensitivity import TRACE_METHODS

C = TypeVar("C", bound="_Config")

#: kind -> config class, for :func:`config_from_dict`.
CONFIG_KINDS: dict[str, type[_Config]] = {}


def _reraise(label: str, name: str, exc: HessqError) -> HessqError:
    """``exc`` with its message naming ``label`` (``Class.field``) instead of the bare ``name``."""
    text = str(exc)
    if text.startswith(name):
        text = label + text[len(name):]
    elif not text.startswith(label):
        text = f"{label}: {text}"
    return type(exc)(text)


class _Config:
    """What every config shares: checks on creation, ``to_dict``/``from_dict``, ``replace``."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        CONFIG_KINDS[cls.KIND] = cls

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            label = f"{type(self).__name__}.{f.name}"
            try:
                value = self._check(f.name, getattr(self, f.name), label)
            except (ConfigError, ArtifactError) as exc:  # ArtifactError: a damaged latency table file
                raise _reraise(label, f.name, exc) from None
            object.__setattr__(self, f.name, value)

    def _check(self, name: str, value: Any, label: str) -> Any:  # pragma: no cover - every config overrides it
        return value

    @classmethod
    def defaults(cls: type[C]) -> dict[str, Any]:
        """Each field's default: what compress and the command line use when it is not given."""
        return {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes``, checked like a new config."""
        _refuse_unknown(type(self), changes, f"{type(self).__name__}.replace")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``kind``, ``version`` and every field."""
        return {"kind": self.KIND, "version": self.VERSION,
                **{name: _jsonable(getattr(self, name)) for name in self.defaults()}}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """The config :meth:`to_dict` wrote. Missing fields take their defaults; an unknown key, a wrong
        type or value, another kind or another version is a :class:`hessq.ConfigError` naming it."""
        name = cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigTypeError(f"{name}.from_dict takes a dict (from to_dict()), got {type(data).__name__}")
        kind = data.get("kind", cls.KIND)
        if kind != cls.KIND:
            raise ConfigError(f"{name}.from_dict got a config of kind {kind!r}, not {cls.KIND!r}: "
                              f"read it with hessq.pipeline.config_from_dict, or give a {cls.KIND!r} dict")
        version = data.get("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"{name}.from_dict got version {version!r}; this hessq reads version {cls.VERSION}: "
                              f"write the config again with this hessq ({name}(...).to_dict())")
        fields = cls.defaults()
        _refuse_unknown(cls, [k for k in data if k not in ("kind", "version")], f"{name}.from_dict")
        values = {k: _from_json(v) for k, v in data.items() if k in fields}
        return cls(**values)


def _refuse_unknown(cls: type[_Config], keys: Any, where: str) -> None:
    """A :class:`ConfigError` naming each key that is not a field of ``cls``, and the field it may have meant."""
    fields = list(cls.defaults())
    unknown = [k for k in keys if k not in fields]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), fields, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                      f"the keys of {cls.__name__} are {', '.join(fields)}")


def config_from_dict(data: Mapping[str, Any]) -> _Config:
    """Any config from its :meth:`to_dict` form, by its ``kind``."""
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"not a hessq config: kind {kind!r}; the kinds are {', '.join(CONFIG_KINDS)}")
    return CONFIG_KINDS[kind].from_dict(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Relative):
        return {"relative": value.fraction}
    if isinstance(value, LatencyTable):
        return value.to_dict()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, Mapping) and set(value) == {"relative"}:
        return Relative(value["relative"])
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def _check_choice(value: Any, label: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{label} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_limit(value: Any, label: str) -> Any:
    parsed = parse_limit(value, label)  # malformed strings, NaN, relative fractions outside (0, 1]
    if isinstance(parsed, float) and parsed <= 0:
        raise ConfigError(f"{label} must be positive (bytes, BOPs or seconds) or a percentage like '50%', got {value!r}")
    return value


def _check_pin(value: Any, label: str) -> int | None:
    if value is None:
        return None
    try:
        return check_weight_bits(value)
    except ConfigError as exc:
        raise ConfigError(f"{label} (None, or the bits of the first and last layer): {exc}") from None


@dataclass(frozen=True)
class SensitivityConfig(_Config):
    """How much each layer minds low bits (see :func:`hessq.hessian_sensitivity`, :func:`hessq.kl_sensitivity`).

    ``method``: ``"hessian"`` (every layer's Hessian trace to ``rtol``, exact on piecewise-linear nets, at
    most ``max_samples`` samples or ``time_budget`` seconds; ``estimator`` picks how, see
    :func:`hessq.hessian_sensitivity`'s ``method``) or ``"kl"`` (ZeroQ's KL on the calibration batches);
    ``batches``: data batches the Hessian reads.
    """

    KIND: ClassVar[str] = "sensitivity"

    method: str = "hessian"
    batches: int = 1
    rtol: float = 0.05
    max_samples: int = 200
    min_samples: int | None = None
    estimator: str = "auto"
    time_budget: float | None = None

    def _check(self, name: str, value: Any, label: str) -> Any:
        if name == "method":
            return _check_choice(value, label, ("hessian", "kl"))
        if name == "rtol":
            return check_number(value, label, low=0)
        if name == "estimator":
            return _check_choice(value, label, TRACE_METHODS)
        if name == "time_budget":
            return check_number(value, label, low=0, strict=True, allow_none=True)
        if name == "min_samples":
            check_int(value, label, low=1, allow_none=True)
            if value is not None and value > self.max_samples:
                raise ConfigError(f"{label} {value} is more than max_samples {self.max_samples}; give at most that many")
            return value
        return check_int(value, label, low=1)


@dataclass(frozen=True)
class PlanConfig(_Config):
    """Choosing bits (see :func:`hessq.plan_bits`): candidate widths, limits, pinned first and last layer,
    the Pareto frontier, the ONNX Runtime latency measurements, and ``row_tiers``: each embedding table's rows
    planned in that many tiers by their lookups on the training data (:func:`hessq.plan_bits`'s ``row_usage``).

    Limits are bytes, BOPs or seconds, or ``"NN%"`` of the way from the all-lowest to the all-highest
    setting; with none of the three, the plan is held to ``size_limit="50%"``. ``latency_table`` (a
    :class:`hessq.LatencyTable`, a mapping or a latency.json path) is measured when a latency limit
    needs one and none is given. ``measure_latency`` times every evaluated setting (``latency_repeats`` runs).
    """

    KIND: ClassVar[str] = "plan"

    weight_bits: tuple[int, ...] = (4, 8)
    act_bits: int = 8
    size_limit: Any = None
    bops_limit: Any = None
    latency_limit: Any = None
    pin_first_last: int | None = 8
    pareto_points: int = 40
    latency_table: Any = None
    measure_latency: bool = True
    latency_repeats: int = 30
    #: Embedding tables split into this many row tiers by lookups on the training data (0: one width per table).
    row_tiers: int = 0
    #: "signed" (HAWQ) or "magnitude": how a negative Hessian trace enters Ω (:data:`hessq.plan.Curvature`).
    curvature: str = "signed"

    def _check(self, name: str, value: Any, label: str) -> Any:
        if name == "row_tiers":
            return check_int(value, label, low=0)
        if name == "curvature":
            return _check_choice(value, label, CURVATURES)
        if name == "weight_bits":
            return check_bits_list(value)
        if name == "act_bits":
            return check_act_bits(value)
        if name.endswith("_limit"):
            return _check_limit(value, label)
        if name == "pin_first_last":
            return _check_pin(value, label)
        if name == "pareto_points":
            return check_int(value, label, low=0)
        if name == "latency_table":
            table = as_latency_table(value)  # a bad file or mapping is refused now, not at the plan stage
            return value if isinstance(value, (str, os.PathLike)) else table
        if name == "measure_latency":
            return check_bool(value, label)
        return check_int(value, label, low=1)

    @property
    def limits(self) -> dict[str, Any]:
        """The limits given, or ``{"size_limit": "50%"}`` when none is."""
        given = {k: v for k, v in (("size_limit", self.size_limit), ("bops_limit", self.bops_limit),
                                   ("latency_limit", self.latency_limit)) if v is not None}
        return given or {"size_limit": "50%"}


@dataclass(frozen=True)
class QuantizeConfig(_Config):
    """Quantize and calibrate (see :func:`hessq.quantize`): ``calibration_batches`` set the activation ranges;
    ``baselines`` are the uniform settings quantized post-training beside the plan for comparison
    (weight bits, or (weight, act) pairs; a bare width takes the plan's ``act_bits``)."""

    KIND: ClassVar[str] = "quantize"

    calibration_batches: int = 8
    baselines: tuple[Any, ...] = (8, 4)

    def _check(self, name: str, value: Any, label: str) -> Any:
        if name == "calibration_batches":
            return check_int(value, label, low=1)
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigTypeError(f"{label} must be a list of weight bit widths or (weight, act) pairs, got {value!r}")
        out = []
        for b in value:
            if isinstance(b, (tuple, list)):
                if len(b) != 2:
                    raise ConfigError(f"{label}: each is a weight bit width or a (weight, act) pair, got {b!r}")
                try:
                    out.append((check_weight_bits(b[0]), check_act_bits(b[1])))
                except ConfigError as exc:
                    raise ConfigError(f"{label} {b!r}: {exc}") from None
            else:
                try:
                    out.append(check_weight_bits(b))
                except ConfigError as exc:
                    raise ConfigError(f"{label} {b!r}: {exc}") from None
        return tuple(out)

    def pairs(self, act_bits: int) -> list[tuple[int, int]]:
        """The baselines as (weight, act) pairs, a bare width taking ``act_bits``."""
        return [b if isinstance(b, tuple) else (b, act_bits) for b in self.baselines]


@dataclass(frozen=True)
class DistillConfig(_Config):
    """ZeroQ distilled inputs when compress gets no data (see :func:`hessq.distill_data`).

    ``num_samples`` inputs, ``batch_size`` at a time, ``steps`` Adam steps at ``lr``; pixels kept in
    ``input_range`` = (low, high) when given; ``label_weight`` of cross-entropy to random classes (0: plain ZeroQ).
    """

    KIND: ClassVar[str] = "distill"

    num_samples: int = 32
    steps: int = 500
    lr: float = 0.5
    batch_size: int = 32
    input_range: tuple[float, float] | None = None
    label_weight: float = 0.0

    def _check(self, name: str, value: Any, label: str) -> Any:
        if name == "steps":
            return check_int(value, label, low=0)
        if name == "lr":
            return check_number(value, label, low=0, strict=True)
        if name == "label_weight":
            return check_number(value, label, low=0)
        if name == "input_range":
            return check_input_range(value)
        return check_int(value, label, low=1)


@dataclass(frozen=True)
class FinetuneConfig(_Config):
    """Quantization-aware training after quantizing (see :func:`hessq.finetune`).

    ``epochs`` may be fractional (a shorter whole cosine schedule); ``max_steps`` stops it early;
    ``distill``: learn from the FP32 model's outputs (the teacher); ``checkpoint``: a resumable checkpoint
    beside the output folder while training, ``qat.ckpt`` in it after; ``resume``: continue from that
    checkpoint when one is there (it must match model, plan and settings); ``optimizer``: ``"sgd"`` with
    momentum (CNNs) or ``"adamw"`` (transformers); ``track_ranges``: activation ranges follow each batch (False:
    they stay as calibrated); ``hidden_weight``: weight of hidden-state distillation (every LayerNorm's output
    matched to the teacher's; 0: logits alone), which needs ``distill``.
    """

    KIND: ClassVar[str] = "finetune"

    epochs: float = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    max_steps: int | None = None
    distill: bool = True
    checkpoint: bool = True
    resume: bool = True
    track_ranges: bool = True
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_weight > 0 and not self.distill:
            raise ConfigError("FinetuneConfig.hidden_weight > 0 distills the FP32 model's hidden states, but distill is "
                              "False: set distill=True, or hidden_weight=0")

    def _check(self, name: str, value: Any, label: str) -> Any:
        if name == "hidden_weight":
            check_number(value, label, low=0)
            return float(value)
        if name in ("epochs", "lr"):
            check_number(value, label, low=0, strict=True)
            return value
        if name == "max_steps":
            return check_int(value, label, low=1, allow_none=True)
        if name == "optimizer":
            if value not in ("sgd", "adamw"):
                raise ConfigError(f"{label} must be 'sgd' or 'adamw', got {value!r}")
            return value
        return check_bool(value, label)


@dataclass(frozen=True)
class ExportConfig(_Config):
    """What compress writes to its output folder: the ONNX graph (``onnx_mode`` ``"exact"``: bit-exact
    integer graph; ``"fast"``: ONNX Runtime's fused int8 kernels) and the HTML ``report``."""

    KIND: ClassVar[str] = "export"

    onnx_mode: str = "exact"
    report: bool = True

    def _check(self, name: str, value: Any, label: str) -> Any:
        if name == "onnx_mode":
            return _check_choice(value, label, ("exact", "fast"))
        return check_bool(value, label)


#: compress's keyword before the configs -> (its config keyword, the field): the deprecated flat form.
FLAT_OPTIONS: dict[str, tuple[str, str]] = {
    "sensitivity_batches": ("sensitivity", "batches"), "max_samples": ("sensitivity", "max_samples"),
    "rtol": ("sensitivity", "rtol"),
    **{name: ("plan", name) for name in PlanConfig.defaults()},
    "calibration_batches": ("quantize", "calibration_batches"), "baselines": ("quantize", "baselines"),
    "num_distilled": ("distill", "num_samples"), "distill_steps": ("distill", "steps"),
    "distill_input_range": ("distill", "input_range"), "distill_label_weight": ("distill", "label_weight"),
    "onnx_mode": ("export", "onnx_mode"), "report": ("export", "report"),
}
#: compress's config keyword -> its class.
CONFIG_ARGUMENTS: dict[str, type[_Config]] = {
    "sensitivity": SensitivityConfig, "plan": PlanConfig, "quantize": QuantizeConfig, "distill": DistillConfig,
    "finetune": FinetuneConfig, "export": ExportConfig,
}
