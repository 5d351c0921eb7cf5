"""The result of a sensitivity analysis: one record per quantizable layer, saved as JSON."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from hessq._errors import ArtifactError, ModelError
from hessq._io import dump_sealed_json, load_sealed_json, parse_sealed_json, save_sealed_json
from hessq.graph import quantizable_layers

FORMAT = "hessq.sensitivity"
#: 2: the file carries a sha256 of its contents (version 1 files had none and are refused).
VERSION = 2
_WHAT = "sensitivity"
_REMEDY = "recompute it with `hessq analyze` or hessq.hessian_sensitivity(model, batches).save(path)"


def _number(value: Any, *, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _layer_record(name: str, rec: Any, source: str) -> "LayerSensitivity":
    """One layer's record from its JSON form; a record of the wrong structure is an ArtifactError."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{source}: the record of layer {name!r} {what}; {_REMEDY}")

    if not isinstance(rec, Mapping):
        raise bad(f"is a {type(rec).__name__}, not an object")
    missing = [k for k in ("trace", "trace_stderr", "top_eigenvalue", "num_params") if k not in rec]
    if missing:
        raise bad(f"lacks {missing}")
    unknown = sorted(set(rec) - {"trace", "trace_stderr", "top_eigenvalue", "num_params", "extra"})
    if unknown:
        raise bad(f"has unknown fields {unknown}")
    for key in ("trace", "trace_stderr"):
        if not _number(rec[key]):
            raise bad(f"has {key} {rec[key]!r}, not a number")
    if not _number(rec["top_eigenvalue"], optional=True):
        raise bad(f"has top_eigenvalue {rec['top_eigenvalue']!r}, not a number or null")
    n = rec["num_params"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise bad(f"has num_params {n!r}, not a positive integer")
    extra = rec.get("extra", {})
    if not isinstance(extra, Mapping):
        raise bad(f"has extra {type(extra).__name__}, not an object")
    return LayerSensitivity(float(rec["trace"]), float(rec["trace_stderr"]),
                            None if rec["top_eigenvalue"] is None else float(rec["top_eigenvalue"]), n, dict(extra))


@dataclass
class LayerSensitivity:
    """How much one layer minds quantization.

    ``trace`` is Tr(H_i) of the layer's weight Hessian block and ``trace_stderr`` its standard
    error (0 when exact; ``extra["estimator"]`` says how it was computed and ``extra["samples"]``
    from how many draws); ``top_eigenvalue`` is λ_max of that block when computed; ``num_params``
    is n_i. ``extra`` holds optional figures (e.g. top-k eigenvalues, activation traces, KL per
    bit width) as plain JSON values.
    """

    trace: float
    trace_stderr: float
    top_eigenvalue: float | None
    num_params: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_trace(self) -> float:
        """Tr(H_i) / n_i, the factor HAWQ-V2/V3 multiply the quantization error by."""
        return self.trace / self.num_params


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """Quantizable layer name -> weight shape: identifies the model a sensitivity belongs to."""
    return {name: list(m.weight.shape) for name, m in quantizable_layers(model).items()}


class Sensitivity(Mapping[str, LayerSensitivity]):
    """Layer name -> :class:`LayerSensitivity`, in network order, plus how it was computed."""

    def __init__(
        self,
        layers: Mapping[str, LayerSensitivity],
        signature: Mapping[str, list[int]] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._layers = dict(layers)
        self.signature = dict(signature) if signature is not None else {}
        self.meta = dict(meta) if meta is not None else {}

    def __getitem__(self, name: str) -> LayerSensitivity:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"Sensitivity({len(self)} layers, meta={self.meta})"

    def check_model(self, model: nn.Module) -> None:
        """Raise if this sensitivity was computed for a model with other layers or shapes."""
        if not self.signature:
            return
        actual = model_signature(model)
        if actual != self.signature:
            missing = sorted(set(self.signature) - set(actual))
            extra = sorted(set(actual) - set(self.signature))
            differ = sorted(n for n in set(actual) & set(self.signature) if actual[n] != self.signature[n])
            raise ModelError(
                "this sensitivity was computed for another model: "
                f"layers only in the sensitivity {missing[:5]}, only in the model {extra[:5]}, "
                f"shapes differ for {differ[:5]}. Recompute it with hessq.hessian_sensitivity(model, ...)."
            )

    def to_dict(self) -> dict[str, Any]:
        """The file's contents without its checksum (``to_json`` and ``save`` add it)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "signature": self.signature,
            "layers": {name: asdict(rec) for name, rec in self._layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "sensitivity data") -> "Sensitivity":
        """Rebuild from :meth:`to_dict`'s form; anything of another structure is an :class:`ArtifactError`
        naming ``source``. The checksum is not looked at here (:meth:`load` and :meth:`from_json` check it)."""
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{source} is not a hessq {_WHAT} (it holds a {type(data).__name__}); {_REMEDY}")
        if data.get("format") != FORMAT:
            raise ArtifactError(f"{source} is not a hessq {_WHAT} (format {data.get('format')!r}, expected {FORMAT!r}); {_REMEDY}")
        if data.get("version") != VERSION:
            raise ArtifactError(f"{source} is {_WHAT} version {data.get('version')!r}; this hessq reads version {VERSION}: {_REMEDY}")
        layers = data.get("layers")
        if not isinstance(layers, Mapping) or not layers:
            what = "has no 'layers'" if layers is None else (
                "has no layer records" if isinstance(layers, Mapping) else f"has 'layers' of type {type(layers).__name__}")
            raise ArtifactError(f"{source} {what}; {_REMEDY}")
        signature, meta = data.get("signature", {}), data.get("meta", {})
        if not isinstance(signature, Mapping) or not all(
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            for shape in signature.values()
        ):
            raise ArtifactError(f"{source}: 'signature' must map layer names to weight shapes (lists of integers); {_REMEDY}")
        if not isinstance(meta, Mapping):
            raise ArtifactError(f"{source}: 'meta' is a {type(meta).__name__}, not an object; {_REMEDY}")
        records = {str(name): _layer_record(str(name), rec, source) for name, rec in layers.items()}
        return cls(records, signature, meta)

    def to_json(self) -> str:
        """JSON text with ``format``, ``version`` and a ``sha256`` of everything else."""
        return dump_sealed_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "sensitivity JSON") -> "Sensitivity":
        content = parse_sealed_json(text, kind=FORMAT, versions={VERSION}, source=source, what=_WHAT, remedy=_REMEDY)
        return cls.from_dict(content, source=source)

    def save(self, path: str | os.PathLike) -> None:
        """Write sealed JSON to a temporary file beside ``path`` and rename it, so no half-written file exists."""
        save_sealed_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Sensitivity":
        """Read a file :meth:`save` wrote. A damaged (checksum), foreign, other-version or malformed file is
        refused whole with an :class:`hessq.ArtifactError` naming it; a missing one is FileNotFoundError."""
        content = load_sealed_json(path, kind=FORMAT, versions={VERSION}, what=_WHAT, remedy=_REMEDY)
        return cls.from_dict(content, source=str(path))
