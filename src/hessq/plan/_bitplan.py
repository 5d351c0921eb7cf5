"""The result of bit allocation: layer name -> weight bits, with totals; saved as sealed JSON (plan.json)."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from typing import Any

from hessq._errors import ConfigError, ConfigTypeError, ModelError
from hessq.plan._files import SealedJSONFile, mapping_or_empty, real_number, required
from hessq.quantizer import check_act_bits, check_weight_bits

FORMAT = "hessq.bitplan"
#: 2: sealed (sha256). Version-1 files had no checksum and are refused.
VERSION = 2

_DETAIL_KEYS = ("num_params", "size_bytes", "bops", "latency", "omega")


def _weight_bits(value: Any, name: str) -> int | None:
    """Bits of one layer: an integer from 2 to 8, or None (keep the layer in floating point)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy integers
    try:
        return check_weight_bits(value)
    except ConfigError:
        raise ConfigError(f"bit plan layer {name!r}: weight bits must be an integer from 2 to 8 (or None to keep "
                          f"it in floating point), got {value!r}") from None


def _row_bits(row_bits: Any, bits: Mapping[str, int | None]) -> dict[str, dict[int, list[int]]]:
    """Checked row widths: table -> {bits: [row, ...]} for the rows not at the table's own width."""
    out: dict[str, dict[int, list[int]]] = {}
    for name, widths in mapping_or_empty(row_bits, "a bit plan's row bits (table -> bits -> rows)").items():
        if name not in bits or bits[name] is None:
            raise ConfigError(f"row bits given for {name!r}, which the plan gives no bits")
        seen: set[int] = set()
        out[str(name)] = {}
        for b, rows in mapping_or_empty(widths, f"the row bits of {name!r}").items():
            b = _weight_bits(int(b) if isinstance(b, str) and b.strip().isdigit() else b, f"{name} rows")
            if not isinstance(rows, (list, tuple)) or not all(
                    isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 0 for r in rows):
                raise ConfigError(f"the rows of {name!r} at {b} bits must be a list of row indices")
            if seen & set(rows) or len(set(rows)) != len(rows):
                raise ConfigError(f"a row of {name!r} is given more than one width")
            seen |= set(rows)
            out[str(name)][b] = [int(r) for r in rows]
    return out


class BitPlan(SealedJSONFile, Mapping[str, int]):
    """Weight bits per quantizable layer (layer name -> bits, in network order; None keeps a layer in float).

    ``act_bits`` is the activation bit width of every layer. ``layers`` holds per-layer figures
    (``num_params``, ``size_bytes``, ``bops``, ``latency``, ``omega``) when the plan came from the
    planner; the totals (:attr:`size_bytes`, :attr:`bops`, :attr:`latency`, :attr:`omega`) sum them
    and are None where unknown. ``limits`` records the absolute limits it was solved under,
    ``signature`` the model it is for (layer -> weight shape) and ``meta`` how it was made.

    ``row_bits`` (table -> bits -> rows) lists the rows of an embedding table planned at other widths than the
    table's (:func:`hessq.plan_bits` with ``row_usage``); :func:`hessq.quantize` gives them those widths.

    Being a plain mapping, a BitPlan can be given to :func:`hessq.quantize` as is; quantize refuses
    it for a model whose layers or weight shapes differ from its ``signature``. Bits that are not
    integers from 2 to 8 (4.5, True, "4", NaN) are refused, never rounded.
    """

    FORMAT = FORMAT
    VERSION = VERSION
    WHAT = "bit plan"
    REMEDY = "make a new one with hessq.plan_bits or `hessq plan`"

    def __init__(
        self,
        bits: Mapping[str, int | None],
        act_bits: int = 8,
        *,
        layers: Mapping[str, Mapping[str, Any]] | None = None,
        limits: Mapping[str, float] | None = None,
        signature: Mapping[str, list[int]] | None = None,
        meta: Mapping[str, Any] | None = None,
        row_bits: Mapping[str, Mapping[Any, Any]] | None = None,
    ) -> None:
        if not isinstance(bits, Mapping):
            raise ConfigTypeError(f"a bit plan's bits must map layer names to weight bits, got {type(bits).__name__}")
        self._bits = {str(n): _weight_bits(b, str(n)) for n, b in bits.items()}
        try:
            self.act_bits = check_act_bits(act_bits)
        except ConfigError as exc:
            raise ConfigError(f"bit plan act_bits: {exc}") from None
        self.layers: dict[str, dict[str, Any]] = {}
        for n, d in mapping_or_empty(layers, "a bit plan's per-layer figures").items():
            row = dict(mapping_or_empty(d, f"the figures of layer {n!r}"))
            for key in _DETAIL_KEYS:
                if key in row:
                    real_number(row[key], f"layer {n!r} {key}", allow_none=True)
            self.layers[str(n)] = row
        unknown = set(self.layers) - set(self._bits)
        if unknown:
            raise ConfigError(f"per-layer figures given for layers without bits: {sorted(unknown)[:5]}")
        self.limits = {str(k): real_number(v, f"limit {k!r}") for k, v in
                       mapping_or_empty(limits, "a bit plan's limits").items() if v is not None}
        self.signature: dict[str, list[int]] = {}
        for n, shape in mapping_or_empty(signature, "a bit plan's signature (layer -> weight shape)").items():
            if not isinstance(shape, (list, tuple)) or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                raise ConfigError(f"the signature of layer {n!r} must be a weight shape (a list of sizes), got {shape!r}")
            self.signature[str(n)] = list(shape)
        self.meta = dict(mapping_or_empty(meta, "a bit plan's meta"))
        self.row_bits = _row_bits(row_bits, self._bits)

    # Mapping
    def __getitem__(self, name: str) -> int:
        return self._bits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BitPlan):
            return self._bits == other._bits and self.act_bits == other.act_bits and self.row_bits == other.row_bits
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
        # costs outside the layers' choice (attention's activation matmuls, in BOPs) count in the total
        return sum(values) + float(self.meta.get("fixed_costs", {}).get(key, 0.0))

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
        if not n or any(b is None for b in self._bits.values()):
            return None
        total = sum(self._bits[k] * d["num_params"] for k, d in self.layers.items())
        for name, widths in self.row_bits.items():  # a table's rows of other widths
            if name not in self.signature:
                return None
            width = self.layers[name]["num_params"] // self.signature[name][0]
            total += sum(len(rows) * width * (b - self._bits[name]) for b, rows in widths.items())
        return total / n

    def totals(self) -> dict[str, float | None]:
        return {
            "size_bytes": self.size_bytes,
            "bops": self.bops,
            "latency": self.latency,
            "omega": self.omega,
            "average_bits": self.average_bits,
        }

    # Files (save/load/to_json/from_json: sealed JSON, from SealedJSONFile)
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
            "row_bits": {n: {str(b): rows for b, rows in w.items()} for n, w in self.row_bits.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BitPlan":
        """A BitPlan from :meth:`to_dict`'s form; wrong kind, version or structure is a ConfigError."""
        data = cls.check_kind(data)
        return cls(
            required(data, "bits", "the bit plan"),
            data.get("act_bits", 8),
            layers=data.get("layers"),
            limits=data.get("limits"),
            signature=data.get("signature"),
            meta=data.get("meta"),
            row_bits=data.get("row_bits"),
        )

    def check_model(self, model) -> None:
        """Raise :class:`ModelError` if this plan was made for a model with other quantizable layers or shapes.

        The message names the layers only in the plan, only in the model, and those whose weight
        shapes differ. A plan without a signature (built by hand) is checked on layer names only.
        """
        from hessq.sensitivity import model_signature

        actual = model_signature(model)
        planned = self.signature or {n: actual.get(n) for n in self._bits}
        only_plan = [n for n in self._bits if n not in actual]
        only_model = [n for n in actual if n not in self._bits]
        reshaped = [n for n in self._bits if n in actual and planned.get(n) is not None and planned[n] != actual[n]]
        if not (only_plan or only_model or reshaped):
            return
        parts = []
        if only_plan:
            parts.append(f"{len(only_plan)} layer(s) the model does not have {_few(only_plan)}")
        if only_model:
            parts.append(f"{len(only_model)} model layer(s) the plan lacks {_few(only_model)}")
        if reshaped:
            parts.append(f"{len(reshaped)} layer(s) with other weight shapes (" + ", ".join(
                f"{n}: plan {planned[n]}, model {actual[n]}" for n in reshaped[:3]) + (" …" if len(reshaped) > 3 else "") + ")")
        raise ModelError(f"this bit plan was made for another model: {'; '.join(parts)}. Re-plan for this model "
                         "(hessq.plan_bits on its sensitivity, or `hessq plan`)")

    def layer_bits_text(self, name: str) -> str:
        """The layer's width as tables show it: ``"2 (121 rows at 6, 1,013 rows at 3)"`` for a table with rows of other
        widths, ``"float"`` for a layer left unquantized."""
        b = self._bits[name]
        shown = "float" if b is None else str(b)
        if self.row_bits.get(name):
            shown += " (" + ", ".join(f"{len(r):,} row{'' if len(r) == 1 else 's'} at {w}"
                                      for w, r in sorted(self.row_bits[name].items(), reverse=True)) + ")"
        return shown

    def layer_average_bits(self, name: str) -> float | None:
        """The layer's weight bits averaged over its weights: its width, or for a table with rows of other widths
        the rows' mean width (None when unquantized, or when the plan lacks the table's row count)."""
        b = self._bits[name]
        if b is None or not self.row_bits.get(name):
            return None if b is None else float(b)
        if name not in self.signature:
            return None
        rows = self.signature[name][0]
        return b + sum(len(r) * (w - b) for w, r in self.row_bits[name].items()) / rows

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
            rows.append([name, self.layer_bits_text(name), f(d.get("num_params"), "int"), f(d.get("size_bytes"), "int"),
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


def _few(names: list[str]) -> str:
    return str(names[:5])[:-1] + (", …]" if len(names) > 5 else "]")
