"""Export of an IntegerModel to ONNX with integer operators, for ONNX Runtime on the CPU.

Activations travel as uint8 codes: zero-point 0 on an unsigned grid, 128 on a signed one
(the same grid, shifted); weights as int8 codes per output channel, or in exact mode as those codes
shifted to uint8 around 128: ONNX Runtime's uint8 × int8 kernels saturate pairs of products at 16 bits
on AVX2 CPUs without VNNI (VPMADDUBSW), its uint8 × uint8 ones are exact on every x86 CPU.

``mode="exact"`` (default) reproduces the integer model: ConvInteger / MatMulInteger give
the int32 accumulators, the int32 bias is added, and requantization multiplies by the
dyadic number b/2^c in float64 (exact for b < 2^31), adds 1/2 and floors — round half up,
as the arithmetic shift does — so outputs match the integer model bit for bit but for
float64 rounding at an exact tie.

``mode="fast"`` runs on ONNX Runtime's fused int8 kernels: each conv (with its ReLU and the
requantization after it) is one QLinearConv writing codes onto the grid its consumer needs,
residual adds are QLinearAdd (a ReLU after them folded in), a global average pool is
QLinearGlobalAveragePool. ONNX Runtime requantizes with a float32 multiplier and rounds half
to even, and a conv feeding an add is rounded onto the add's grid before adding, so values
can differ from the integer model by a step; the top-1 class almost never does.

On a transformer, fast mode carries real float32 values between int8 kernels with static scales:
each 8-bit Linear and attention product is com.microsoft MatMulIntegerToFloat on the uint8 codes
its input grid gives (a ≤4-bit Linear is MatMulNBits), softmax, LayerNorm and GELU are ONNX
Runtime's float kernels, an embedding is one uint8 Gather of its output codes (bit for bit), and a
rounding that only float kernels read is a Clip to its grid's range (the saturation kept, the
rounding left out). Each op is then within about a step of its integer twin given the same input;
over a deep model the steps compound, so the agreement is measured (bench/ibert.py), not bounded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from hessq._checks import check_bool
from hessq._errors import ConfigError, ConfigTypeError, MissingDependencyError
from hessq._io import check_writable, write_atomic
from hessq.integer._model import IntegerModel
from hessq.integer._onnx_siblings import fuse_sibling_matmuls
from hessq.ops import WEIGHT_ZERO_POINT, Op, family_for_kind, saturates, uint8_weights
from hessq.ops.mask import ID_READERS
from hessq.plan import LatencyTable, as_latency_table

OPSET = 17


def require_onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError("ONNX export needs the onnx package: pip install 'hessq[onnx]' (onnx, onnxruntime)") from exc
    return onnx, TensorProto, helper, numpy_helper


@dataclass
class _Tensor:
    name: str
    kind: str  # "codes": uint8 on a grid; "acc": float64 exact integers at scale; "real": float32 value
    scale: float = 0.0
    zero_point: int = 0
    # fast mode: codes that are a zero-point padding of `padded_from` by (top, left, bottom, right), so a
    # QLinearConv reading them can take the padding as its own (asymmetric) pads instead
    padded_from: "_Tensor | None" = None
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    # fast mode: a real value that is a Clip of `clipped_from` to `clip_range`, so a second saturation right after
    # it clips the source once to the intersection
    clipped_from: str = ""
    clip_range: tuple[float, float] = (0.0, 0.0)


class _Exporter:
    def __init__(self, model: IntegerModel, mode: str = "exact", narrow_kernels: bool | LatencyTable = True) -> None:
        self.onnx, self.TP, self.helper, self.nh = require_onnx()
        self.model = model
        self.exact = mode == "exact"
        self.narrow_kernels = narrow_kernels
        self.nodes, self.inits = [], []
        self.values: dict[str, _Tensor] = {}
        self.grid_signed: dict[str, bool] = {}
        self.users: dict[str, list[Op]] = {}
        for op in model.ops:
            for name in op.inputs:
                self.users.setdefault(name, []).append(op)
        self.producers = {op.output: op for op in model.ops}
        self.fused: set[str] = set()
        self.uses_ms_domain = False
        self._n = 0
        # every value's shape at batch 1, for shape-dependent choices (a pool that covers the whole map)
        env = model.run(torch.zeros(1, *model.input_shape), keep=True)
        self.model_shapes = {k: tuple(v.shape) for k, v in env.items()}

    def narrow_kernel(self, op: Op) -> bool:
        """Whether the fast export runs a weighted op whose width has a kernel of its own (a Linear of at most 4-bit
        weights: MatMulNBits; such a table: GatherBlockQuantized) on that kernel rather than the int8 one: always,
        never, or where the latency table times it faster than the same layer at 8 bits."""
        if isinstance(self.narrow_kernels, bool):
            return self.narrow_kernels
        name, bits = self.model.layer_name(op), int(op.attrs["w_bits"])
        row = self.narrow_kernels.get(name)
        if row is None or bits not in row or 8 not in row:
            raise ConfigError(f"narrow_kernels: the latency table has no time for layer {name!r} at {bits} and 8 bits; "
                              "measure it on this integer model (hessq.integer.measure_latency_table), or pass "
                              "narrow_kernels=True or False")
        return row[bits] < row[8]

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}__{self._n}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(self.nh.from_array(np.asarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], base: str, domain: str = "", **attrs) -> str:
        out = self.fresh(base)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        if domain == "com.microsoft":
            self.uses_ms_domain = True
        return out

    def prune(self) -> None:
        """Drop nodes and constants nothing reads (e.g. a Pad folded into the conv after it)."""
        needed, kept = {"output"}, []
        for n in reversed(self.nodes):
            if any(o in needed for o in n.output):
                kept.append(n)
                needed.update(n.input)
        self.nodes = kept[::-1]
        self.inits = [t for t in self.inits if t.name in needed]

    # -- conversions between codes and real values ------------------------------------------------
    def scale_zp(self, t: _Tensor) -> tuple[str, str]:
        return self.const("scale", np.float32(t.scale)), self.const("zp", np.uint8(t.zero_point))

    def real(self, t: _Tensor) -> str:
        if t.kind == "real":
            return t.name
        s, zp = self.scale_zp(t)
        return self.node("DequantizeLinear", [t.name, s, zp], "dq")

    def codes(self, name_in: str, scale: float, signed: bool, base: str, bounds: tuple[int, int] | None = None) -> _Tensor:
        """uint8 codes of the real value ``name_in`` on the grid of step ``scale`` (zero-point 128 if ``signed``).

        QuantizeLinear saturates at the uint8 range; a grid ``bounds`` = (qmin, qmax) narrower than that (4-bit
        activations) is clipped to first. One code of slack is left at each end, so an 8-bit signed grid (±127)
        takes no extra pass: a value below its range gets code −128 there, one step beyond the integer model's.
        """
        zp = 128 if signed else 0
        t = _Tensor("", "codes", scale, zp)
        if bounds is not None and (bounds[0] + zp > 1 or bounds[1] + zp < 254):
            lo, hi = self.const("lo", np.float32(bounds[0] * scale)), self.const("hi", np.float32(bounds[1] * scale))
            name_in = self.node("Clip", [name_in, lo, hi], "grid_range")
        s, z = self.scale_zp(t)
        t.name = self.node("QuantizeLinear", [name_in, s, z], base)
        return t

    def on_grid(self, name_in: str, op: Op, base: str) -> _Tensor:
        """uint8 codes of the real value ``name_in`` on the output grid of ``op`` (its scale, qmin and qmax); a grid
        wider than uint8 (a 16-bit residual stream) stays real, clipped to its range: within half a step of it."""
        if op.attrs["qmax"] - op.attrs["qmin"] > 255:
            return self.clipped(name_in, op)
        return self.codes(name_in, float(op.scale), op.attrs["qmin"] < 0, base, (op.attrs["qmin"], op.attrs["qmax"]))

    def weight_codes(self, codes: np.ndarray, base: str = "w", *, channels: int = 0, exact: bool = False) -> tuple[str, str]:
        """(weights, zero-point) constants of an integer kernel (ConvInteger, MatMulInteger, QLinearConv,
        MatMulIntegerToFloat) on int8 weight ``codes``.

        ONNX Runtime's uint8 × int8 kernels saturate each pair of products at 16 bits on AVX2 CPUs without VNNI
        (VPMADDUBSW); its uint8 × uint8 kernels are exact on every x86 CPU. So weights beyond ±64, and every weight of
        the exact export, go as uint8 around zero-point 128; weights within ±64 (2·255·64 < 2^15: no pair can
        saturate) stay int8, the faster kernel. ``channels``: that many zero points (QLinearConv's per-channel form);
        0: one, or none ("") for int8 weights."""
        if exact or saturates(codes):
            weights, zero = uint8_weights(codes), WEIGHT_ZERO_POINT
        else:
            weights, zero = np.asarray(codes).astype(np.int8), 0
        if not channels and not zero:
            return self.const(base, weights), ""
        zp = np.full(channels, zero, weights.dtype) if channels else np.asarray(zero, weights.dtype)
        return self.const(base, weights), self.const(f"{base}_zp", zp)

    def as_codes_input(self, t: _Tensor, op: Op | None = None) -> _Tensor:
        if t.kind != "codes":
            where = f"layer `{self.model.layer_name(op)}`" if op is not None else "a layer"
            raise ConfigError(f"{where} reads activation codes wider than 8 bits, which this export runs on no integer "
                              "kernel; give it at most 8-bit inputs (plan (w_bits, 8)), or keep the integer model")
        return t

    def byte_planes(self, x: _Tensor, name: str) -> list[tuple[str, int, float]]:
        """Codes wider than uint8 (float64 integers ``x``, the value ``name``) as two uint8 planes for an integer
        kernel: [(plane, zero point, weight)], x = Σ weight · (plane − zero point), each product exact in the kernel.

        With the grid's range [qmin, qmax] (at most 2^16 codes) and o = 256·⌈−qmin/256⌉, x + o = 256·hi + lo with hi,
        lo bytes; the zero points o/256 and 0 make a padding with zero points a padding of x with 0."""
        op = self.producers[name]
        while "qmin" not in op.attrs and op.inputs:  # past the ops that keep the grid (pad, max-pool, reshape)
            op = self.producers[op.inputs[0]]
        if "qmin" not in op.attrs:
            raise RuntimeError(f"internal: no grid range found for `{name}`")
        qmin, qmax = int(op.attrs["qmin"]), int(op.attrs["qmax"])
        offset = 256 * -(-max(0, -qmin) // 256)
        if qmax + offset > 2**16 - 1:
            raise ConfigError(f"`{name}` holds codes in [{qmin}, {qmax}], beyond 16 bits; the exact export splits codes "
                              "into two bytes at most: quantize that activation to at most 16 bits")
        f64 = np.float64
        shifted = self.node("Add", [x.name, self.const("offset", f64(offset))], "shifted") if offset else x.name
        high = self.node("Floor", [self.node("Div", [shifted, self.const("byte", f64(256))], "over_256")], "high_f64")
        low = self.node("Sub", [shifted, self.node("Mul", [high, self.const("byte", f64(256))], "high_256")], "low_f64")
        cast = [self.node("Cast", [t], base, to=self.TP.UINT8) for t, base in ((high, "high"), (low, "low"))]
        return [(cast[0], offset // 256, 256.0), (cast[1], 0, 1.0)]

    # -- exact-mode integer arithmetic in float64 ----------------------------------------------------
    def acc(self, t: _Tensor) -> str:
        """float64 integers standing for ``t`` at its own scale (codes minus zero-point, or an accumulator)."""
        if t.kind == "acc":
            return t.name
        if t.kind != "codes":
            raise RuntimeError("internal: a float value in the exact export")
        d = self.node("Cast", [t.name], "codes_f64", to=self.TP.DOUBLE)
        return self.node("Sub", [d, self.const("zp", np.float64(t.zero_point))], "centred") if t.zero_point else d

    def round_half_up(self, acc: str, b: torch.Tensor, c: torch.Tensor) -> str:
        # b and c are shaped to broadcast against the accumulator already
        m = torch.ldexp(b.double(), -c).numpy()  # b/2^c, exact in float64
        scaled = self.node("Mul", [acc, self.const("dyadic", m.astype(np.float64))], "scaled")
        return self.node("Floor", [self.node("Add", [scaled, self.const("half", np.float64(0.5))], "half")], "rounded")

    def to_codes(self, rounded: str, qmin: int, qmax: int, scale: float) -> _Tensor:
        if qmax - qmin > 255:  # a grid wider than uint8 (16-bit codes) stays float64 integers
            lo, hi = self.const("qmin", np.float64(qmin)), self.const("qmax", np.float64(qmax))
            return _Tensor(self.node("Clip", [rounded, lo, hi], "clip"), "acc")
        zp = 128 if qmin < 0 else 0
        lo, hi = self.const("qmin", np.float64(qmin + zp)), self.const("qmax", np.float64(qmax + zp))
        shifted = self.node("Add", [rounded, self.const("zp", np.float64(zp))], "shifted") if zp else rounded
        clipped = self.node("Clip", [shifted, lo, hi], "clip")
        return _Tensor(self.node("Cast", [clipped], "codes", to=self.TP.UINT8), "codes", scale, zp)

    def tensor(self, name: str, kind: str, scale: float = 0.0, zero_point: int = 0) -> _Tensor:
        """An exported value: ``kind`` "codes" (uint8 on a grid), "acc" (float64 integers) or "real" (float32)."""
        return _Tensor(name, kind, scale, zero_point)

    def accumulator(self, op: Op, acc: str) -> _Tensor:
        """A weighted op's int32 products plus its bias: exact integers (exact mode) or real values (fast)."""
        # ONNX Runtime accumulates the products in int32, which holds them (checked below); the bias is added
        # after widening, because a large bias against a small input scale can carry the sum past 2^31.
        self.check_int32_products(op)
        dtype = self.TP.DOUBLE if self.exact else self.TP.FLOAT
        return self._biased(op, self.node("Cast", [acc], "acc_f64" if self.exact else "acc_f", to=dtype))

    def wide_accumulator(self, op: Op, x: _Tensor, kernel: Callable[[str, str], str]) -> _Tensor:
        """Exact mode: a weighted op's accumulator on codes wider than uint8 (a 16-bit input), which ONNX's integer
        kernels do not take. ``kernel(plane, zero_point)`` (its ConvInteger or MatMulInteger node) runs on each byte
        plane of the codes (:meth:`byte_planes`); the int32 results are summed in float64 by the planes' weights
        (every partial sum an integer below 2^53), then the bias is added."""
        widest_row = int(op.tensors["weight"].abs().flatten(1).sum(1).max())
        if 255 * widest_row >= 2**31:
            raise ConfigError(f"layer `{self.model.layer_name(op)}` can accumulate up to {255 * widest_row:,} on one "
                              "byte of its 16-bit inputs, beyond ONNX Runtime's int32 accumulators; quantize it to "
                              "fewer weight bits or at most 8-bit inputs, or keep the integer model")
        acc = None
        for plane, zero, weight in self.byte_planes(x, op.inputs[0]):
            part = self.node("Cast", [kernel(plane, self.const("x_zp", np.uint8(zero)))], "plane_f64", to=self.TP.DOUBLE)
            part = self.node("Mul", [part, self.const("plane_weight", np.float64(weight))], "weighted")
            acc = part if acc is None else self.node("Add", [acc, part], "planes")
        return self._biased(op, acc)

    def _biased(self, op: Op, acc: str) -> _Tensor:
        """``acc`` (float64 or float32 accumulator integers) plus ``op``'s bias: the exact value, or in fast mode the
        real one."""
        shape = [1, -1] + [1] * (len(self.model_shapes[op.output]) - 2) if getattr(family_for_kind(op.kind), "channel_dim", 1) == 1 else [-1]
        dtype = np.float64 if self.exact else np.float32
        if "bias" in op.tensors:
            acc = self.node("Add", [acc, self.const("bias", op.tensors["bias"].numpy().astype(dtype).reshape(shape))], "bias")
        if self.exact:
            return _Tensor(acc, "acc")
        scale = op.scale.numpy().astype(np.float32)
        return _Tensor(self.node("Mul", [acc, self.const("acc_scale", scale)], "acc_real"), "real")

    def real_weights(self, op: Op) -> tuple[np.ndarray, np.ndarray | None]:
        """Fast mode: a weighted op's weights and bias as real values (float32), for a float kernel reading a real
        input (a 16-bit grid, which no int8 kernel takes): the codes times S_w, the accumulator's scale over the
        input's, per output row."""
        s_acc = op.scale.reshape(-1).double()
        codes = op.tensors["weight"].double()
        s_w = (s_acc / float(self.producers[op.inputs[0]].scale)).reshape(-1, *[1] * (codes.dim() - 1))
        bias = (op.tensors["bias"].double() * s_acc).numpy().astype(np.float32) if "bias" in op.tensors else None
        return (codes * s_w).numpy().astype(np.float32), bias

    def check_int32_products(self, op: Op) -> None:
        """Refuse a weighted op whose products (before the bias) can overflow ONNX Runtime's int32 accumulators."""
        products = op.attrs["bound"] - (int(op.tensors["bias"].abs().max()) if "bias" in op.tensors else 0)
        if products >= 2**31:
            raise ConfigError(
                f"layer `{op.output}` can accumulate up to {products:,} before its bias, beyond ONNX Runtime's int32 "
                "accumulators; quantize that layer to fewer weight or activation bits, or keep the integer model"
            )

    def qlinear_weights(self, op: Op, x: _Tensor) -> tuple[str, str, str]:
        """(weight, weight scale, weight zero-point) constants of a QLinear kernel reading ``x``."""
        codes = op.tensors["weight"].numpy()
        w_scale = (op.scale.reshape(-1).double() / x.scale).numpy().astype(np.float32)
        if w_scale.size == 1:
            w_scale = np.full(codes.shape[0], w_scale.item(), np.float32)
        w, w_zp = self.weight_codes(codes, channels=codes.shape[0])
        return w, self.const("w_scale", w_scale), w_zp

    def fast_output_grid(self, op: Op) -> tuple[list[Op], Op, _Tensor, Op | None] | None:
        """Where a weighted op's fused int8 kernel should write its codes, in fast mode.

        Follows op → [relu | clamp] → [zero pad] (each used once) and returns (chain, last op, the output
        grid, the requantize folded in or None). The grid is that of the single requantize that follows
        (exact placement), else of a requantize, add or cat among the consumers (the add then runs on int8
        codes as ONNX Runtime's QLinearAdd, as its own quantizer does); None when no consumer has a grid.
        """
        chain, cur = [], op
        users = self.users.get(cur.output, [])
        allowed: tuple[str, ...] = ("relu", "clamp", "pad")
        while len(users) == 1 and users[0].kind in allowed:
            cur = users[0]
            chain.append(cur)
            users = self.users.get(cur.output, [])
            allowed = ("pad",) if cur.kind != "pad" else ()

        def grid_of(u: Op) -> _Tensor:
            return _Tensor("", "codes", float(u.scale), 128 if u.attrs["qmin"] < 0 else 0)

        def fits(u: Op) -> bool:  # uint8 codes hold the grid (a 16-bit one stays real: no int8 kernel writes it)
            return u.attrs["qmax"] - u.attrs["qmin"] <= 255

        if len(users) == 1 and users[0].kind == "requantize":
            return (chain, cur, grid_of(users[0]), users[0]) if fits(users[0]) else None
        for kind in ("requantize", "add", "cat"):
            for u in users:
                if u.kind == kind:
                    return (chain, cur, grid_of(u), None) if fits(u) else None
        if len(users) == 1 and users[0].kind == "sum_pool2d":
            # an average pool then a requantize: the average stays within the inputs' range, so the codes go on
            # the grid after the pool (QLinearGlobalAveragePool then keeps it)
            req = self.requantize_after(users[0])
            if req is not None and fits(req):
                return chain, cur, grid_of(req), None
        return None

    def sole_user(self, op: Op, kind: str) -> Op | None:
        """The op of ``kind`` that alone reads ``op``'s output, or None."""
        users = self.users.get(op.output, [])
        return users[0] if len(users) == 1 and users[0].kind == kind else None

    def read_as_real(self, op: Op) -> bool:
        """Fast mode: whether every reader of ``op``'s output computes in float32 from real values (a LayerNorm, a
        softmax, an activation run in float), so that rounding the value onto its grid can be left out."""
        users = self.users.get(op.output, [])
        # a requantize read only by such kernels is left out itself, so it counts as one of them
        return not self.exact and bool(users) and all(
            self.read_as_real(u) if u.kind == "requantize" else family_for_kind(u.kind).fast_reads_real(u) for u in users)

    def saturation_needed(self, op: Op) -> bool:
        """Fast mode: whether a reader of ``op``'s output (a rounding left out) needs the value clipped to the grid's
        range; a requantize reading it does."""
        return any(u.kind == "requantize" or family_for_kind(u.kind).fast_saturates_input(u, op)
                   for u in self.users.get(op.output, []))

    def clipped(self, t: _Tensor | str, op: Op) -> _Tensor:
        """The real value ``t`` clipped to the range of ``op``'s grid (qmin·s … qmax·s): the saturation of the
        rounding onto the grid that fast mode leaves out (one pass instead of a quantize and a dequantize)."""
        s = float(op.scale)
        lo, hi = op.attrs["qmin"] * s, op.attrs["qmax"] * s
        source = t if isinstance(t, str) else self.real(t)
        if isinstance(t, _Tensor) and t.clipped_from:  # clip the source once (the first Clip is pruned if unread)
            source, lo, hi = t.clipped_from, max(lo, t.clip_range[0]), min(hi, t.clip_range[1])
        name = self.node("Clip", [source, self.const("lo", np.float32(lo)), self.const("hi", np.float32(hi))], "saturate")
        return _Tensor(name, "real", clipped_from=source, clip_range=(lo, hi))

    def requantize_after(self, op: Op) -> Op | None:
        """The single requantize that reads ``op``'s output, past any flatten or reshape; None if there is none."""
        follow = self.users.get(op.output, [])
        while len(follow) == 1 and follow[0].kind in ("flatten", "reshape"):
            follow = self.users.get(follow[0].output, [])
        return follow[0] if len(follow) == 1 and follow[0].kind == "requantize" else None

    def fuse_chain(self, op: Op, chain: list[Op], last: Op, y: _Tensor, req: Op | None) -> _Tensor:
        """Fold the ReLU / ReLU6 / pad after a fused int8 kernel's output ``y`` into the export; the ops of
        ``chain`` (and the requantize ``req`` when given) are then skipped and read ``y``."""
        for extra in chain:
            if extra.kind == "relu" and y.zero_point:
                y.name = self.node("Max", [y.name, self.const("zero", np.uint8(y.zero_point))], "relu")
            elif extra.kind == "clamp":
                six = float((extra.tensors["max"].double().reshape(-1)[0] * op.scale.reshape(-1)[0]).item())
                hi = min(255, y.zero_point + int(round(six / y.scale)))
                if y.zero_point or hi < 255:  # on an unsigned grid that ends below 6 the kernel already clips
                    y.name = self.node("Clip", [y.name, self.const("lo", np.uint8(y.zero_point)),
                                                self.const("hi", np.uint8(hi))], "relu6")
            elif extra.kind == "pad":
                y = family_for_kind("pad").onnx(self, extra, [y])  # zero on the accumulator is the zero-point in codes
            self.fused.add(extra.output)
        if req is not None:
            self.fused.add(req.output)
            self.values[req.output] = y
        self.values[last.output] = y
        return y

    def run(self, input_name: str) -> None:
        self.values[self.model.input_name] = _Tensor(input_name, "real")
        for op in self.model.ops:
            if op.output in self.fused:
                continue
            family = family_for_kind(op.kind)
            emit = family.onnx if self.exact else family.onnx_fast
            self.values[op.output] = emit(self, op, [self.values[n] for n in op.inputs])


def export_onnx(
    model: IntegerModel,
    path: str | os.PathLike,
    *,
    mode: str = "exact",
    batch_size: int | None = None,
    narrow_kernels: bool | LatencyTable | Mapping | str | os.PathLike = True,
    fuse_siblings: bool = True,
) -> None:
    """Write ``model`` as an ONNX graph of integer operators for ONNX Runtime.

    ``mode="exact"`` matches the integer model bit for bit (ConvInteger + dyadic
    requantization in float64); ``mode="fast"`` uses ONNX Runtime's fused int8 kernels
    (QLinearConv; MatMulIntegerToFloat and MatMulNBits for Linear layers and attention, float
    softmax, LayerNorm and GELU), each op within about one quantization step of it. ``batch_size=None`` leaves the batch dimension
    dynamic. The file is written to a temporary name and renamed; a ``path`` that is a directory
    or lies under a file is refused before any work.

    ``narrow_kernels`` (fast mode; the exact export refuses a table) says where a layer at a width with a kernel of
    its own runs on it (a Linear of at most 4-bit weights on MatMulNBits, a table of at most 4-bit codes on
    GatherBlockQuantized): ``True`` everywhere
    (the smallest file), ``False`` nowhere (every layer on the int8 kernels: MatMulNBits is slower than int8 at more
    than about one token row on many CPUs), or a latency table (:func:`hessq.integer.measure_latency_table` of this
    model, or its file) to run each layer on the kernel it times faster.

    ``fuse_siblings`` (fast mode): int8 Linears that read the same codes (a transformer's query, key and value) run
    as one MatMulIntegerToFloat over their stacked weights and a Split, with the same values. Fewer kernel calls
    pay at small batches (MiniLM, T=64: 3–4% faster at batch 1); the Split's copy costs about 3% at batch 32, so pass
    ``False`` for throughput at large batches.
    """
    if not isinstance(model, IntegerModel):
        raise ConfigTypeError(f"export_onnx takes an IntegerModel (hessq.to_integer(qmodel)), got {type(model).__name__}")
    if mode not in ("exact", "fast"):
        raise ConfigError(f"mode must be 'exact' or 'fast', got {mode!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer, or None for a dynamic batch dimension; got {batch_size!r}")
    check_bool(fuse_siblings, "fuse_siblings")
    if not isinstance(narrow_kernels, (bool, Mapping, str, os.PathLike)):
        raise ConfigTypeError("narrow_kernels must be True, False or a latency table (or its latency.json), got "
                              f"{type(narrow_kernels).__name__}")
    if not isinstance(narrow_kernels, bool):
        if mode == "exact":  # a table the exact export would ignore: the user meant the fast one
            raise ConfigError("a latency table (narrow_kernels) chooses the kernels of mode='fast'; mode='exact' runs "
                              "every layer on exact integer operators. Pass mode='fast' with it, or leave it out")
        narrow_kernels = as_latency_table(narrow_kernels)
    check_writable(path, "ONNX file")  # a directory or a path under a file: refused before the export's work
    exporter = _Exporter(model, mode, narrow_kernels)
    onnx, TP, helper = exporter.onnx, exporter.TP, exporter.helper
    for op in model.ops:
        if op.kind == "flatten" and op.attrs["end_dim"] != -1:
            raise ConfigError("ONNX export supports flatten to the last dimension only")
    # a model that reads token ids (an embedding lookup, the padding mask) takes them as int64
    readers = {op.kind for op in model.ops if model.input_name in op.inputs}
    input_type = TP.INT64 if readers and readers <= set(ID_READERS) else TP.FLOAT
    exporter.run("input")
    final = exporter.values[model.output_name]
    exporter.nodes.append(helper.make_node("Identity", [final.name], ["output"], name="output"))
    if fuse_siblings and mode == "fast":
        exporter.nodes, exporter.inits = fuse_sibling_matmuls(exporter.nodes, exporter.inits, helper, exporter.nh)
    exporter.prune()
    batch = batch_size if batch_size is not None else "batch"
    out_shape = list(model(torch.zeros(1, *model.input_shape)).shape[1:])
    graph = helper.make_graph(
        exporter.nodes,
        "hessq_integer_model",
        [helper.make_tensor_value_info("input", input_type, [batch, *model.input_shape])],
        [helper.make_tensor_value_info("output", TP.FLOAT, [batch, *out_shape])],
        exporter.inits,
    )
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if exporter.uses_ms_domain else [])
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="hessq")
    onnx.checker.check_model(proto)
    write_atomic(path, lambda tmp: onnx.save(proto, tmp))
