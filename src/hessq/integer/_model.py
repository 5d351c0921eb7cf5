"""IntegerModel: the integer program, its reference executor, and its file format."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hessq._checks import check_inputs, check_int, check_model
from hessq._errors import ArtifactError, ConfigError, ConfigTypeError, InputDataError, ModelError
from hessq._io import load_torch_safely, write_atomic
from hessq.ops import IntegerConversionError, Op, family_for_kind, run_program
from hessq.quantizer import KERNELS

FORMAT = "hessq.integer-model"
#: 2: tensors whose values repeat along a dimension are stored once along it ("expand").
#: 3: weights of b < 8 bits are stored as a stream of b-bit codes ("packed": [bits, shape]), not as nibbles; output
#: scales are compacted too; int64 constants that fit a narrower type are stored in it ("widen").
#: 4: a table whose rows have widths of their own (a plan's row tiers) stores each width's rows packed at that width
#: ("packed_rows"). Files of versions 1 to 3 still load.
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes in [-2^(bits-1), 2^(bits-1)) → uint8, a little-endian stream of ``bits`` bits per code.

    Each code is stored offset by 2^(bits-1) (so unsigned), its low bit first; the last byte is padded with zeros.
    A 2-bit table takes a quarter of its int8 bytes, a 3-bit one 3/8.
    """
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (int(codes.min()) < low or int(codes.max()) > high):
        raise IntegerConversionError(
            f"weight codes span [{int(codes.min())}, {int(codes.max())}], outside the {bits}-bit range [{low}, {high}]: "
            "the op's w_bits does not match its weights")
    flat = codes.flatten().to(torch.int16)
    # uint8 throughout: a 30522 × 384 table at 7 bits is an 82 MB bit stream, not 656 MB of int64
    place = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat - low).to(torch.uint8).unsqueeze(1) >> place & 1).flatten()
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    if not 1 <= bits < 8 or packed.dtype != torch.uint8 or packed.numel() != -(-n * bits // 8):
        raise ValueError(f"a packed weight of {packed.numel()} bytes does not hold {n} codes of {bits} bits")
    stream = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8) & 1).flatten()[: n * bits]
    place = torch.arange(bits, dtype=torch.uint8)
    codes = (stream.view(n, bits) << place).sum(1, dtype=torch.int16) - (1 << (bits - 1))
    return codes.reshape(shape).to(torch.int8)


def _unpack_rows(tensors: Mapping[str, torch.Tensor], refs: Mapping[str, Any], parts: list, shape: list[int],
                 row_bits_name: str) -> torch.Tensor:
    """A table stored as each width's rows packed at that width (version 4), back as int8 codes."""
    ref = next((r for r in refs.values() if r.get("name") == row_bits_name), None)
    if ref is None:
        raise ValueError(f"a table packed by row widths without its row widths ({row_bits_name})")
    widths = _restore(tensors[row_bits_name], ref)
    if widths.shape != (shape[0],) or sorted(b for b, _ in parts) != sorted(widths.unique().tolist()):
        raise ValueError("a table's packed rows do not cover its row widths")
    table = torch.empty(shape, dtype=torch.int8)
    for bits, name in parts:
        rows = widths == bits
        shape_b = [int(rows.sum())] + list(shape[1:])
        table[rows] = _unpack_bits(tensors[name], bits, shape_b) if bits < 8 else tensors[name].reshape(shape_b)
    return table


def _compact(t: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """``t`` as stored, and what :func:`_restore` needs to rebuild it exactly.

    - Stored once along every dimension its values repeat on (``"expand"``: the full shape). A per-channel multiplier
      or output scale requantizing a tensor laid out as heads × tokens × head width is (1, 12, 64, 32) values of
      which 384 differ: 21 MB of the tweets MiniLM's W8A8 file before version 3.
    - int64 values that fit a narrower integer type are stored in it (``"widen"``): a per-row multiplier b < 2^31
      takes 4 bytes, its shift c one.
    """
    extras: dict[str, Any] = {}
    if t.dim() == 0 or t.numel() < 64:  # small tensors: not worth an entry
        return t, extras
    r = t
    for d in range(t.dim()):
        if r.shape[d] > 1:
            first = r.narrow(d, 0, 1)
            if torch.equal(r, first.expand_as(r)):
                r = first
    if r.numel() < t.numel():
        extras["expand"] = list(t.shape)
    if r.dtype == torch.int64 and r.numel():
        low, high = int(r.min()), int(r.max())
        for narrow in (torch.int8, torch.int16, torch.int32):
            if torch.iinfo(narrow).min <= low and high <= torch.iinfo(narrow).max:
                r, extras["widen"] = r.to(narrow), "int64"
                break
    # a fresh tensor with row-major strides (a narrowed one can keep its parent's strides, even "contiguous")
    return (torch.empty(r.shape, dtype=r.dtype).copy_(r), extras) if extras else (t, extras)


def _restore(t: torch.Tensor, ref: dict[str, Any]) -> torch.Tensor:
    """The tensor :func:`_compact` stored as ``t`` with ``ref``'s entries (version 2 files: ``"expand"`` alone)."""
    if "widen" in ref:
        if ref["widen"] != "int64":
            raise ValueError(f"a stored tensor asks to be widened to {ref['widen']!r}")
        t = t.to(torch.int64)
    if "expand" in ref:
        t = t.expand(ref["expand"]).contiguous()
    return t


def _unpack_nibbles(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Weights of version 1 and 2 files: int8 codes in [-8, 7], two per byte (low nibble first), two's complement."""
    p = packed.to(torch.int16)
    flat = torch.stack([p & 0xF, p >> 4], 1).flatten()
    flat = torch.where(flat >= 8, flat - 16, flat)
    n = 1
    for s in shape:
        n *= s
    return flat[:n].reshape(shape).to(torch.int8)


class IntegerModel:
    """An integer-only model: int8 weights, int32 biases, dyadic requantization.

    ``model(x)`` quantizes the float input, runs every op on int64 tensors (integer
    multiply, add, arithmetic shift, clamps, integer sums) and dequantizes the output
    for the user. ``ops`` lists the program; each op's ``scale`` is its output scale.
    ``kernel='int64'`` runs the products as int64 matrix products instead of the
    (exact) float BLAS kernels.
    """

    def __init__(self, ops: list[Op], input_name: str, output_name: str, input_shape: tuple[int, ...], meta: dict | None = None) -> None:
        self.ops = ops
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape = tuple(input_shape)
        self.meta = dict(meta or {})

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for op in self.ops:
            kinds[op.kind] = kinds.get(op.kind, 0) + 1
        return f"IntegerModel(input {self.input_shape}, {len(self.ops)} ops: {kinds})"

    def layer_name(self, op: Op) -> str:
        """A weighted op's layer as plans and latency tables name it: its module path (``layer1.0.conv1`` for the
        value ``layer1_0_conv1``), or its value name when the model records no such layer."""
        known = {name.replace(".", "_"): name for name in self.meta.get("layer_bits", {})}
        return known.get(op.output, op.output)

    def layers(self) -> Iterator[Op]:
        """The ops of weighted layers (conv, linear, ...), in program order."""
        return (op for op in self.ops if family_for_kind(op.kind).weighted)

    @torch.no_grad()
    def run(self, x: torch.Tensor, *, kernel: str = "auto", keep: bool = False) -> dict[str, torch.Tensor] | torch.Tensor:
        """Execute the program; with ``keep`` return every named value (codes) instead of the output.

        ``x`` is a float32 batch of shape (N, *input_shape), as the float model took it: raw uint8
        images, other float dtypes and NaN or infinite values are refused (nothing would say the
        result is wrong: NaN quantizes to a code like any other).
        """
        if kernel not in KERNELS:
            raise ConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        expected = f"(N, {', '.join(map(str, self.input_shape))})"
        if not isinstance(x, torch.Tensor):
            raise InputDataError(f"the integer model takes a float32 tensor of shape {expected}, got {type(x).__name__}")
        pad = self.meta.get("pad_token_id")
        if (pad is not None and not x.is_floating_point() and x.dim() == 2 and len(self.input_shape) == 1
                and x.shape[1] < self.input_shape[0]):
            x = torch.nn.functional.pad(x, (0, self.input_shape[0] - x.shape[1]), value=int(pad))
        if tuple(x.shape[1:]) != self.input_shape:
            longer = pad is not None and x.dim() == 2 and len(self.input_shape) == 1
            raise InputDataError(f"input shape {tuple(x.shape)} does not match the model's {expected}" + (
                f": it was compiled for at most {self.input_shape[0]} tokens; build it for longer inputs with "
                f"hessq.to_integer(qmodel, input_shape=({x.shape[1]},))" if longer else ""))
        check_inputs(x, None, where="the integer model's inputs")
        return run_program(self.ops, self.input_name, self.output_name, x, kernel=kernel, keep=keep)

    def __call__(self, x: torch.Tensor, *, kernel: str = "auto") -> torch.Tensor:
        return self.run(x, kernel=kernel)

    # -- files ----------------------------------------------------------------------------------
    def _payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        program, tensors = [], {}
        for i, op in enumerate(self.ops):
            entry = {"kind": op.kind, "inputs": op.inputs, "output": op.output, "attrs": op.attrs, "tensors": {}}
            for key, t in op.tensors.items():
                name = f"{i}.{key}"
                bits = op.attrs.get("w_bits", 8)
                if key == "weight" and "row_bits" in op.tensors:  # each width's rows packed at that width
                    parts = []
                    for b in op.tensors["row_bits"].unique().tolist():
                        rows = t[op.tensors["row_bits"] == b]
                        tensors[f"{name}.{b}"] = _pack_bits(rows, b) if b < 8 else rows.to(torch.int8).contiguous()
                        parts.append([b, f"{name}.{b}"])
                    entry["tensors"][key] = {"name": name, "packed_rows": [parts, list(t.shape), f"{i}.row_bits"]}
                elif key == "weight" and bits < 8:
                    tensors[name] = _pack_bits(t, bits)
                    entry["tensors"][key] = {"name": name, "packed": [bits, list(t.shape)]}
                else:
                    stored, extras = _compact(t)
                    tensors[name] = stored.contiguous()
                    entry["tensors"][key] = {"name": name, **extras}
            if op.scale is not None:
                stored, extras = _compact(op.scale)
                tensors[f"{i}.scale_out"] = stored.contiguous()
                entry["scale"] = {"name": f"{i}.scale_out", **extras}
            program.append(entry)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "input_shape": list(self.input_shape),
            "meta": self.meta,
            "program": program,
        }
        return header, tensors

    @staticmethod
    def _digest(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for name in sorted(tensors):
            t = tensors[name]
            h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """One versioned file with a checksum, written to a temporary name and renamed."""
        header, tensors = self._payload()
        blob = {"header": json.dumps(header), "tensors": tensors, "sha256": self._digest(header, tensors)}
        write_atomic(path, lambda tmp: torch.save(blob, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "IntegerModel":
        """Read a file :meth:`save` wrote, with ``weights_only=True`` (no pickled code runs).

        A directory, an empty, truncated, damaged (checksum), foreign or other-version file, or a
        pickle that asks for code, is refused with an :class:`hessq.ArtifactError` naming the file.
        """
        path = Path(path)
        remedy = "re-export it with this hessq (hessq.to_integer(qmodel).save(path))"
        if path.is_dir():
            raise ArtifactError(f"{path} is a directory, not a hessq integer model file; name the .hq file inside it")
        if not path.exists():
            raise FileNotFoundError(f"no integer model file at {path}")
        blob = load_torch_safely(path, what="integer model", remedy=remedy)
        try:
            header = json.loads(blob["header"])
            tensors = blob["tensors"]
            digest = blob["sha256"]
            if not isinstance(header, dict) or not isinstance(tensors, dict):
                raise TypeError("header or tensors of the wrong type")
        except Exception as exc:  # another layout: a missing key, a header that is not JSON, ...
            raise ArtifactError(f"{path} is not a hessq integer model ({type(exc).__name__}: {exc}); {remedy}") from None
        if header.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a hessq integer model (format {header.get('format')!r}); {remedy}")
        if header.get("version") not in READABLE_VERSIONS:
            raise ArtifactError(
                f"{path} is integer-model file version {header.get('version')}, this hessq reads versions {', '.join(map(str, READABLE_VERSIONS))}; {remedy}"
            )
        try:
            if cls._digest(header, tensors) != digest:
                raise ArtifactError(f"{path} is corrupt: its checksum does not match its contents; {remedy}")
            ops = []
            for entry in header["program"]:
                op_tensors = {}
                for key, ref in entry["tensors"].items():
                    if "packed_rows" in ref:
                        op_tensors[key] = _unpack_rows(tensors, entry["tensors"], *ref["packed_rows"])
                        continue
                    t = tensors[ref["name"]]
                    if "packed" in ref:
                        t = _unpack_bits(t, *ref["packed"])
                    elif "packed4" in ref:
                        t = _unpack_nibbles(t, ref["packed4"])
                    else:
                        t = _restore(t, ref)
                    op_tensors[key] = t
                scale = None
                if "scale" in entry:  # versions 1 and 2: the tensor's name
                    ref = entry["scale"] if isinstance(entry["scale"], dict) else {"name": entry["scale"]}
                    scale = _restore(tensors[ref["name"]], ref)
                ops.append(Op(entry["kind"], entry["inputs"], entry["output"], entry["attrs"], op_tensors, scale))
            return cls(ops, header["input_name"], header["output_name"], tuple(header["input_shape"]), header["meta"])
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            raise ArtifactError(f"{path} holds an integer program of the wrong structure ({type(exc).__name__}: "
                                f"{exc}); {remedy}") from None

    def size_bytes(self) -> int:
        """Bytes of the stored weights (packed), biases and requantization constants."""
        _, tensors = self._payload()
        return sum(t.numel() * t.element_size() for t in tensors.values())


def to_integer(qmodel: Any, *, input_shape: Sequence[int] | None = None) -> IntegerModel:
    """The integer-only model of a calibrated :func:`hessq.quantize` result, compiled for inputs of
    ``input_shape`` (without the batch dimension; default: the calibration inputs'). A text model's integer
    model (token ids, a padding token known from its capture) also takes shorter inputs, padded to its length:
    the attention mask leaves the logits of the real tokens unchanged.

    Raises :class:`IntegerConversionError` naming any op with no integer form (e.g.
    sigmoid, softmax, layer norm) and for a model that was never calibrated.
    """
    if isinstance(qmodel, torch.nn.Module):
        # Weights only: an uncalibrated quantizer's observer holds ±inf, and compile_program names that case.
        check_model(qmodel, "the quantized model", finite=False)
        for name, p in qmodel.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise ModelError(f"the quantized model has NaN or infinite values in {name!r}: an integer model needs "
                                 "finite weights; check the float model it was quantized from")
    if not callable(getattr(qmodel, "program", None)):
        raise ConfigTypeError(f"to_integer needs a model from hessq.quantize, got {type(qmodel).__name__}")
    if input_shape is not None:
        if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__"):
            raise ConfigTypeError(f"input_shape must be a tuple of sizes without the batch dimension, got {input_shape!r}")
        input_shape = tuple(check_int(d, "input_shape", low=1) for d in input_shape)
    ops, input_name, output_name, input_shape = qmodel.program(input_shape)
    meta = {"layer_bits": {k: list(v) for k, v in qmodel.layer_bits.items()}}
    if getattr(qmodel, "pad_token_id", None) is not None:
        meta["pad_token_id"] = int(qmodel.pad_token_id)
    return IntegerModel(ops, input_name, output_name, input_shape, meta)


def load_integer(path: str | os.PathLike) -> IntegerModel:
    """Load an IntegerModel saved by :meth:`IntegerModel.save`."""
    return IntegerModel.load(path)
