"""The result of bit allocation: layer name -> weight bits, with totals; saved as JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hessq._errors import ConfigError
from hessq._io import write_text_atomic
from hessq.quantizer._functional import check_act_bits, check_weight_bits

FORMAT = "hessq.bitplan"
VERSION = 1

_DETAIL_KEYS = ("num_params", "size_bytes", "bops", "latency", "omega")


class BitPlan(Mapping[str, int]):
    """Weight bits per quantizable layer (layer name -> bits, in network order).

    ``act_bits`` is the activation bit width of every layer. ``layers`` holds per-layer figures
    (``num_params``, ``size_bytes``, ``bops``, ``latency``, ``omega``) when the plan came from the
    planner; the totals (:attr:`size_bytes`, :attr:`bops`, :attr:`latency`, :attr:`omega`) sum them
    and are None where unknown. ``limits`` records the absolute limits it was solved under,
    ``signature`` the model it is for (layer -> weight shape) and ``meta`` how it was made.

    Being a plain mapping, a BitPlan can be given to :func:`hessq.quantize` as is.
    """

    def __init__(
        self,
        bits: Mapping[str, int],
        act_bits: int = 8,
        *,
        layers: Mapping[str, Mapping[str, Any]] | None = None,
        limits: Mapping[str, float] | None = None,
        signature: Mapping[str, list[int]] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._bits = {str(n): check_weight_bits(int(b) if not isinstance(b, bool) else b) for n, b in bits.items()}
        self.act_bits = check_act_bits(act_bits)
        self.layers: dict[str, dict[str, Any]] = {n: dict(d) for n, d in (layers or {}).items()}
        unknown = set(self.layers) - set(self._bits)
        if unknown:
            raise ConfigError(f"per-layer figures given for layers without bits: {sorted(unknown)[:5]}")
        self.limits = {k: v for k, v in (limits or {}).items() if v is not None}
        self.signature = dict(signature) if signature is not None else {}
        self.meta = dict(meta) if meta is not None else {}

    # Mapping
    def __getitem__(self, name: str) -> int:
        return self._bits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BitPlan):
            return self._bits == other._bits and self.act_bits == other.act_bits
        return super().__eq__(other)

    __hash__ = None  # mutable-looking mapping; compare by value

    def __repr__(self) -> str:
        parts = [f"{len(self)} layers", f"act_bits={self.act_bits}"]
        if self.average_bits is not None:
            parts.append(f"average_bits={self.average_bits:.3f}")
        if self.size_bytes is not None:
            parts.append(f"size_bytes={self.size_bytes:,.0f}")
        if self.omega is not None:
            parts.append(f"omega={self.omega:.4g}")
        return f"BitPlan({', '.join(parts)})"

    # Totals
    def _total(self, key: str) -> float | None:
        if not self.layers or len(self.layers) != len(self._bits):
            return None
        values = [d.get(key) for d in self.layers.values()]
        if any(v is None for v in values):
            return None
        return sum(values)

    @property
    def size_bytes(self) -> float | None:
        """Total size in bytes: packed weights, int32 biases, per-channel scales."""
        return self._total("size_bytes")

    @property
    def bops(self) -> float | None:
        """Total bit operations of one forward pass (MACs × weight bits × activation bits)."""
        return self._total("bops")

    @property
    def latency(self) -> float | None:
        """Total latency in seconds from the latency table (None without one)."""
        return self._total("latency")

    @property
    def omega(self) -> float | None:
        """Total perturbation Σ_i Ω_i(b_i) (None for a plan built without a sensitivity)."""
        return self._total("omega")

    @property
    def num_params(self) -> int | None:
        return self._total("num_params")

    @property
    def average_bits(self) -> float | None:
        """Weight bits averaged over all weights (Σ n_i b_i / Σ n_i)."""
        n = self.num_params
        if not n:
            return None
        return sum(self._bits[k] * d["num_params"] for k, d in self.layers.items()) / n

    def totals(self) -> dict[str, float | None]:
        return {
            "size_bytes": self.size_bytes,
            "bops": self.bops,
            "latency": self.latency,
            "omega": self.omega,
            "average_bits": self.average_bits,
        }

    # Files
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "act_bits": self.act_bits,
            "bits": dict(self._bits),
            "layers": self.layers,
            "totals": self.totals(),
            "limits": self.limits,
            "signature": self.signature,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BitPlan":
        if data.get("format") != FORMAT:
            raise ConfigError(f"not a hessq bit plan (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ConfigError(f"bit plan version {data.get('version')!r} is not supported (expected {VERSION})")
        return cls(
            data["bits"],
            data.get("act_bits", 8),
            layers=data.get("layers"),
            limits=data.get("limits"),
            signature=data.get("signature"),
            meta=data.get("meta"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "BitPlan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON to a temporary file beside ``path`` and rename it onto ``path``."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitPlan":
        try:
            return cls.from_json(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); the file is truncated or not a bit plan") from exc

    def check_model(self, model) -> None:
        """Raise if this plan was made for a model with other quantizable layers or shapes."""
        from hessq.sensitivity import model_signature

        actual = model_signature(model)
        expected = self.signature or {n: actual.get(n) for n in self._bits}
        if set(self._bits) != set(actual) or (self.signature and actual != expected):
            missing = sorted(set(self._bits) - set(actual))
            extra = sorted(set(actual) - set(self._bits))
            raise ConfigError(
                f"this bit plan was made for another model: layers only in the plan {missing[:5]}, "
                f"only in the model {extra[:5]}"
            )

    def table(self, markdown: bool = True) -> str:
        """A per-layer table (bits, weights, size, BOPs, latency, Ω) with a total row."""
        header = ["layer", "bits", "weights", "size (B)", "MBOPs", "latency (µs)", "Ω"]
        rows = []

        def f(v: Any, kind: str) -> str:
            if v is None:
                return "–"
            if kind == "int":
                return f"{v:,.0f}"
            if kind == "mbops":
                return f"{v / 1e6:,.2f}"
            if kind == "us":
                return f"{v * 1e6:,.2f}"
            return f"{v:.4g}"

        for name, b in self._bits.items():
            d = self.layers.get(name, {})
            rows.append([name, str(b), f(d.get("num_params"), "int"), f(d.get("size_bytes"), "int"),
                         f(d.get("bops"), "mbops"), f(d.get("latency"), "us"), f(d.get("omega"), "g")])
        avg = self.average_bits
        rows.append(["**total**" if markdown else "total", f"{avg:.3f} avg" if avg is not None else "–",
                     f(self.num_params, "int"), f(self.size_bytes, "int"), f(self.bops, "mbops"),
                     f(self.latency, "us"), f(self.omega, "g")])
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            return "\n".join(lines) + "\n"
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt_row(header)] + [fmt_row(r) for r in rows]) + "\n"
