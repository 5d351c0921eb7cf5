"""The result of a sensitivity analysis: one record per quantizable layer, saved as JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from hessq._errors import ConfigError
from hessq._io import write_text_atomic
from hessq.graph import quantizable_layers

FORMAT = "hessq.sensitivity"
VERSION = 1


@dataclass
class LayerSensitivity:
    """How much one layer minds quantization.

    ``trace`` is Tr(H_i) of the layer's weight Hessian block (Hutchinson estimate) and
    ``trace_stderr`` its standard error; ``top_eigenvalue`` is λ_max of that block when
    computed; ``num_params`` is n_i. ``extra`` holds optional figures (e.g. top-k
    eigenvalues, activation traces, KL per bit width) as plain JSON values.
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
            raise ConfigError(
                "this sensitivity was computed for another model: "
                f"layers only in the sensitivity {missing[:5]}, only in the model {extra[:5]}, "
                f"shapes differ for {differ[:5]}. Recompute it with hessq.hessian_sensitivity(model, ...)."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "signature": self.signature,
            "layers": {name: asdict(rec) for name, rec in self._layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Sensitivity":
        if data.get("format") != FORMAT:
            raise ConfigError(f"not a hessq sensitivity file (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ConfigError(
                f"sensitivity file version {data.get('version')!r} is not supported by this hessq "
                f"(expected {VERSION}); recompute it with `hessq analyze`"
            )
        layers = {name: LayerSensitivity(**rec) for name, rec in data["layers"].items()}
        return cls(layers, data.get("signature"), data.get("meta"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Sensitivity":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON to a temporary file beside ``path`` and rename it, so no half-written file exists."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Sensitivity":
        try:
            text = Path(path).read_text()
            return cls.from_json(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); the file is truncated or not a sensitivity file") from exc

