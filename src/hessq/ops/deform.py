"""Deformable conv (:class:`hessq.nn.DeformConv2d`, CoDeNet): quantized twin, BatchNorm folding, integer kernel, ONNX.

Quantization. The main weight is quantized like a conv's (symmetric, per output channel by default, the plan's
bits) and its bias to int32 at S_w·S_in; the input is the layer's input quantizer's codes. The offset branch is
part of the layer: it reads the same input codes, its weight is quantized to :data:`OFFSET_WEIGHT_BITS` bits per
channel and its bias to int32 at S_off·S_in. Its output is quantized only with ``round_offsets=True``, onto the
integer pixel grid (scale 1): offset = ⌊acc·m + ½⌋ with m = S_off·S_in written as a dyadic number b/2^c, then
clamped (±bound, the square's [0, 8]); that is one requantization, ``(acc·b + 2^(c−1)) >> c``. The twin's float
forward computes these integers exactly from the input codes (a straight-through gradient carries the float
offsets' gradient), so the fake-quant model samples the very pixels the integer model gathers. Without
``round_offsets`` the offsets stay float and are sampled bilinearly: such a layer has a fake-quant twin for
training but no integer form.

Integer kernel (one program op, ``deform_conv2d``): the offset branch as an integer conv on the input codes, its
accumulator requantized to integer pixel offsets, an integer gather of input codes (zero outside the image), and
the conv as an integer grouped 1×1 conv over the gathered columns, accumulated exactly, then the usual
requantization by the consumer.

The offsets' dyadic number keeps b·|acc| < 2^51 (fewer than 31 bits in b for large accumulators) so that the
exact ONNX export can do the rounding in float64 without a rounding error of its own.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.nn._deform import (SQUARE_MAX, DeformConv2d, deform_conv2d, limit_branch, round_half_up, sample_columns,
                              square_offsets, tap_positions)
from hessq.ops._program import Op, Value
from hessq.ops._registry import IntegerConversionError, family_for_kind, register
from hessq.ops._weighted import INT32_MAX, QuantLayer, WeightedOp
from hessq.quantizer import WeightQuantizer, choose_kernel, expand_scale, integer_conv2d, qrange, requantize, round_ste

#: Bits of the offset branch's weight codes (fixed: the branch is part of the layer, not a layer of the plan).
OFFSET_WEIGHT_BITS = 8
#: b·|acc| + 2^(c−1) stays below 2^52: exact in float64 (the ONNX export's arithmetic).
_EXACT_PRODUCT_BITS = 51
_MAX_SHIFT = 52


def offset_multiplier(m: torch.Tensor, acc_bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, c) int64 with b/2^c ≈ m (per channel) and b·acc_bound < 2^51, c ≤ 52: the offsets' dyadic number."""
    m = torch.as_tensor(m, dtype=torch.float64)
    bits = min(31, _EXACT_PRODUCT_BITS - int(acc_bound).bit_length())
    if bits < 8:
        raise IntegerConversionError(
            f"the offset branch can accumulate up to {acc_bound:,}, too large for exact integer offsets; quantize "
            "the layer's input to fewer bits")
    _, exponent = torch.frexp(m)
    c = (bits - exponent.to(torch.int64)).clamp(0, _MAX_SHIFT)
    b = torch.round(torch.ldexp(m, c)).to(torch.int64)
    over = b >= 2**bits
    c = torch.where(over & (c > 0), c - 1, c)
    b = torch.round(torch.ldexp(m, c)).to(torch.int64)
    if (b >= 2**bits).any():
        raise IntegerConversionError(f"an offset scale of {float(m.max()):.3g} pixels per accumulator step is too "
                                     "large for integer offsets")
    return b, c


def _rounded(v: float) -> int:
    return int(np.floor(v + 0.5))


def offset_limits(attrs: dict, input_hw: tuple[int, int]) -> tuple[int, int]:
    """(lo, hi) of the integer offsets (for ``square``, of the scale): the bound and the square's [0, 8] rounded
    as the float module rounds them, else a reach past which every sample is outside the image (clamping there
    changes nothing, and keeps the integers small)."""
    reach = max(input_hw) + 2 * max(attrs["padding"]) + 2
    lo, hi = -reach, reach
    if attrs["offset_bound"] is not None:
        lo, hi = _rounded(-attrs["offset_bound"]), _rounded(attrs["offset_bound"])
    if attrs["square"]:
        lo, hi = max(lo, 0), min(hi, int(SQUARE_MAX))
    return lo, hi


def square_template(attrs: dict) -> torch.Tensor:
    """int64 [1, 2·kh·kw, 1, 1]: tap t's (dy, dx) per unit of the square's scale, (ci·dilation, cj·dilation)."""
    kh, kw = attrs["kernel_size"]
    ci = (torch.arange(kh) - (kh - 1) // 2) * attrs["dilation"][0]
    cj = (torch.arange(kw) - (kw - 1) // 2) * attrs["dilation"][1]
    pairs = torch.stack([ci.view(kh, 1).expand(kh, kw).reshape(-1), cj.view(1, kw).expand(kh, kw).reshape(-1)], 1)
    return pairs.reshape(1, -1, 1, 1).to(torch.int64)


def integer_branch(codes: torch.Tensor, tensors: dict[str, torch.Tensor], attrs: dict, kernel: str) -> torch.Tensor:
    """int64 [N, B, H_out, W_out]: the offset branch on int64 input ``codes``, requantized to integer pixels and
    clamped (B = 2·kh·kw per-tap offsets, or 1: the square's scale)."""
    ch = lambda t: t.reshape(1, -1, 1, 1)  # noqa: E731
    acc = integer_conv2d(codes, tensors["offset_weight"].to(torch.int64), attrs["stride"], attrs["padding"],
                         attrs["dilation"], 1, kernel) + ch(tensors["offset_bias"].to(torch.int64))
    lo, hi = offset_limits(attrs, tuple(codes.shape[-2:]))
    return requantize(acc, ch(tensors["offset_b"]), ch(tensors["offset_c"]), lo, hi)


def integer_offsets(codes: torch.Tensor, tensors: dict[str, torch.Tensor], attrs: dict, kernel: str) -> torch.Tensor:
    """int64 per-tap offsets [N, 2·kh·kw, H_out, W_out] of the offset branch on int64 input ``codes``."""
    branch = integer_branch(codes, tensors, attrs, kernel)
    return branch * square_template(attrs).to(branch.device) if attrs["square"] else branch


def _geometry(attrs: dict) -> tuple:
    return tuple(tuple(attrs[k]) for k in ("kernel_size", "stride", "padding", "dilation"))


def gather_codes(codes: torch.Tensor, offsets: torch.Tensor, attrs: dict) -> torch.Tensor:
    """The integer deformed im2col: [N, C·kh·kw, H_out, W_out] of int64 input ``codes`` at int64 ``offsets``
    (channel c·kh·kw + tap, as the weight's rows), 0 outside the image: the float module's exact gather."""
    return sample_columns(codes, offsets, *_geometry(attrs), integer_offsets=True)


class QuantDeformConv2d(QuantLayer):
    """DeformConv2d with quantized weights, int32-grid biases and (with ``round_offsets``) exact integer offsets."""

    def __init__(self, m: DeformConv2d, w_bits: int, a_bits: int, granularity: str = "channel", num_groups: int = 1) -> None:
        super().__init__()
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "offset_bound", "square", "round_offsets"):
            setattr(self, attr, getattr(m, attr))
        self.weight = nn.Parameter(m.weight.detach().clone())
        self.bias = nn.Parameter(m.bias.detach().clone()) if m.bias is not None else None
        # plain parameters, not an nn.Conv2d: the branch is no quantizable layer of its own
        self.offset_weight = nn.Parameter(m.offset.weight.detach().clone())
        self.offset_bias = nn.Parameter(m.offset.bias.detach().clone() if m.offset.bias is not None
                                        else torch.zeros(m.offset.out_channels))
        self.offset_quantizer = WeightQuantizer(OFFSET_WEIGHT_BITS, "channel")
        self._init_quant(w_bits, a_bits, granularity, num_groups)
        self._float_module = (DeformConv2d.offsets_from_branch,)

    def layer_attrs(self) -> dict:
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "offset_bound": self.offset_bound,
                "square": self.square}

    def _input_ready(self) -> bool:
        q = self.act_quantizer
        return q is not None and not q.observing and bool(q.calibrated)

    @torch.no_grad()
    def offset_program(self, input_scale: torch.Tensor, input_qmax: int) -> dict[str, torch.Tensor]:
        """The offset branch's integer tensors for inputs at ``input_scale`` with codes up to ``input_qmax``:
        weight codes, int32-range bias codes and the dyadic (b, c) to integer pixels, per branch channel."""
        w = self.offset_weight
        scale = self.offset_quantizer.scale(w).double()
        lo, hi = qrange(OFFSET_WEIGHT_BITS, signed=True)
        codes = torch.clamp(torch.round(w.double() / expand_scale(scale, w, 0)), lo, hi).to(torch.int64)
        acc_scale = scale * input_scale.double()
        bias = torch.clamp(torch.round(self.offset_bias.double() / acc_scale), -INT32_MAX, INT32_MAX).to(torch.int64)
        bound = int(codes.abs().flatten(1).sum(1).max()) * int(input_qmax) + int(bias.abs().max())
        b, c = offset_multiplier(acc_scale, bound)
        return {"offset_weight": codes.to(torch.int8), "offset_bias": bias.to(torch.int32), "offset_b": b,
                "offset_c": c, "offset_bound": torch.tensor(bound)}

    def _float_offsets(self, x: torch.Tensor) -> torch.Tensor:
        """The offset branch in fake quantization (the gradient's path): 8-bit weights, int32-grid bias."""
        w = self.offset_quantizer(self.offset_weight)
        b = self.offset_bias
        if self._input_ready():
            bias_scale = self.offset_quantizer.scale(self.offset_weight) * self.act_quantizer.scale
            b = torch.clamp(round_ste(b / bias_scale), -INT32_MAX, INT32_MAX) * bias_scale
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)

    def compute_offsets(self, x: torch.Tensor) -> torch.Tensor:
        """The per-tap offsets the layer samples ``x`` at: with ``round_offsets`` (and a calibrated input), the
        integer model's exact integers, with the float offsets' straight-through gradient."""
        limited = limit_branch(self._float_offsets(x), self.offset_bound, self.square)
        if self.round_offsets and self._input_ready():
            q = self.act_quantizer
            codes = torch.round(x.detach().double() / q.scale.double()).to(torch.int64)
            tensors = self.offset_program(q.scale, max(-q.qmin, q.qmax))
            exact = integer_branch(codes, tensors, self.layer_attrs(), choose_kernel(int(tensors["offset_bound"])))
            limited = limited + (exact.to(limited.dtype) - limited).detach()
        elif self.round_offsets:  # calibration: the input has no grid yet
            limited = round_half_up(limited)
        return square_offsets(limited, self.kernel_size, self.dilation) if self.square else limited

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight_and_bias()
        return deform_conv2d(x, self.compute_offsets(x), w, b, self.stride, self.padding, self.dilation, self.groups,
                             integer_offsets=self.round_offsets)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, w_bits={self.w_bits}, a_bits={self.a_bits}, offset_bits={OFFSET_WEIGHT_BITS}"
                + (", round_offsets=True" if self.round_offsets else ""))


@torch.no_grad()
def fold_deform_bn(m: DeformConv2d, bn: nn.BatchNorm2d) -> DeformConv2d:
    """A new DeformConv2d computing m then bn (eval mode): the main conv folds as a conv does, the offset branch
    (which reads the input) is unchanged."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise ConfigError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    folded = copy.deepcopy(m)
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    folded.weight.copy_(m.weight * factor.reshape(-1, 1, 1, 1))
    bias = m.bias if m.bias is not None else torch.zeros_like(bn.running_mean)
    folded.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)
    return folded


@register
class DeformConv(WeightedOp):
    name = "deform_conv2d"
    modules = (DeformConv2d,)
    kinds = ("deform_conv2d",)
    twin = QuantDeformConv2d

    def fold_batchnorm(self, module, bn):
        return fold_deform_bn(module, bn) if isinstance(bn, nn.BatchNorm2d) else None

    def macs(self, module, inputs, output):
        # the deformed conv and the offset branch (the sampling is no multiply-accumulate of weights)
        n, _, oh, ow = output.shape
        branch = module.offset_weight if isinstance(module, QuantDeformConv2d) else module.offset.weight
        return output.numel() * module.weight[0].numel() + n * oh * ow * branch.shape[0] * branch[0].numel()

    def compile(self, program, node, m, args, kwargs):
        v: Value = args[0]
        q_in = m.act_quantizer
        if v.scale is None or q_in is None or v.scale.dim() or float(v.scale) != float(q_in.scale.double()):
            raise IntegerConversionError(f"internal: input of `{node.target}` is not on its quantizer's grid")
        if not m.round_offsets:
            raise IntegerConversionError(
                f"the deformable conv `{node.target}` samples at fractional offsets (bilinear interpolation), which has "
                "no integer-only form. Build the layer with round_offsets=True (CoDeNet's rounded offsets: a gather), "
                "or evaluate in float fake quantization (model.integer_eval = False)")
        w, s_w = m.integer_weight()
        bias = m.integer_bias(v.scale)
        tensors = {"weight": w.to(torch.int8), **m.offset_program(v.scale, v.qmax)}
        offset_bound = int(tensors.pop("offset_bound"))
        if bias is not None:
            tensors["bias"] = bias.to(torch.int32)
        bound = int(w.abs().flatten(1).sum(1).max()) * v.qmax + (int(bias.abs().max()) if bias is not None else 0)
        attrs = {"w_bits": m.w_bits, "kernel": choose_kernel(bound), "bound": bound, "offset_kernel": choose_kernel(offset_bound),
                 "offset_acc_bound": offset_bound, **m.layer_attrs()}
        dummy = self.deform_accumulate(v.dummy.to(torch.int64), tensors, attrs, "float64", "float64")
        acc_scale = expand_scale(s_w, torch.empty(w.shape[0]), 0) * v.scale
        return program.emit(node.name, self.kinds[0], [v], dummy, self.per_channel(acc_scale, dummy.dim()), bound, attrs, tensors)

    @staticmethod
    def deform_accumulate(codes: torch.Tensor, tensors: dict, attrs: dict, kernel: str, offset_kernel: str) -> torch.Tensor:
        """int64 accumulators (without bias) of the integer deformable conv on int64 input ``codes``."""
        offsets = integer_offsets(codes, tensors, attrs, offset_kernel)
        cols = gather_codes(codes, offsets, attrs)
        w = tensors["weight"].to(torch.int64)
        return integer_conv2d(cols, w.reshape(w.shape[0], -1, 1, 1), 1, 0, 1, attrs["groups"], kernel)

    def execute(self, op, inputs, kernel):
        forced = kernel == "int64"
        acc = self.deform_accumulate(inputs[0], op.tensors, op.attrs, "int64" if forced else op.attrs["kernel"],
                                     "int64" if forced else op.attrs["offset_kernel"])
        if "bias" in op.tensors:
            acc = acc + self.per_channel(op.tensors["bias"].to(torch.int64), acc.dim())
        return acc

    # -- ONNX: integer offsets, a Gather of the codes, the conv family's own emission on the gathered columns -------
    def _onnx_offsets(self, ex, op: Op, x, exact: bool) -> str:
        """Integer offsets [N, 2·kh·kw, H_out, W_out] as float64 (exact) or float32 (fast) values, clamped and
        times the square's template. Exact: ConvInteger, bias, (acc·b + 2^(c−1))·2^−c floored in float64 (exact:
        b·|acc| < 2^51). Fast, when the limits fit int8: one QLinearConv onto the pixel grid (scale 1), which
        rounds half to even in float32 (an offset can differ at a tie)."""
        a, t = op.attrs, op.tensors
        ch = lambda v: np.asarray(v, np.float64).reshape(1, -1, 1, 1)  # noqa: E731
        conv = dict(strides=a["stride"], pads=a["padding"] * 2, dilations=a["dilation"])
        lo, hi = offset_limits(a, tuple(ex.model_shapes[op.inputs[0]][-2:]))
        c = t["offset_c"].to(torch.int64)
        m = torch.ldexp(t["offset_b"].double(), -c)
        if not exact and -128 <= lo and hi <= 127:
            w_codes, w_zp = ex.weight_codes(t["offset_weight"].numpy(), "w_offset", channels=t["offset_weight"].shape[0])
            inputs = [x.name, *ex.scale_zp(x), w_codes, ex.const("w_scale", (m / x.scale).numpy().astype(np.float32)),
                      w_zp, ex.const("pixel", np.float32(1.0)),
                      ex.const("pixel_zp", np.uint8(128)), ex.const("offset_bias", t["offset_bias"].numpy().astype(np.int32))]
            pixels = ex.node("Cast", [ex.node("QLinearConv", inputs, "offset_qconv", **conv)], "offsets_f", to=ex.TP.FLOAT)
            pixels = ex.node("Sub", [pixels, ex.const("pixel_zp_f", np.float32(128))], "offsets_centred")
            clipped = ex.node("Clip", [pixels, ex.const("lo", np.float32(lo)), ex.const("hi", np.float32(hi))], "offset_clip")
        else:
            w_exact, w_zp = ex.weight_codes(t["offset_weight"].numpy(), "w_offset", exact=True)
            acc = ex.node("ConvInteger", [x.name, w_exact, ex.const("x_zp", np.uint8(x.zero_point)), w_zp], "offset_acc",
                          **conv)
            acc = ex.node("Cast", [acc], "offset_acc_f64", to=ex.TP.DOUBLE)
            acc = ex.node("Add", [acc, ex.const("offset_bias", ch(t["offset_bias"].numpy()))], "offset_biased")
            half = torch.where(c > 0, torch.ldexp(torch.ones(c.shape, dtype=torch.float64), c - 1),
                               torch.zeros(c.shape, dtype=torch.float64))
            scaled = ex.node("Mul", [acc, ex.const("offset_b", ch(t["offset_b"].double().numpy()))], "offset_scaled")
            scaled = ex.node("Add", [scaled, ex.const("offset_half", ch(half.numpy()))], "offset_half")
            shift = torch.ldexp(torch.ones(c.shape, dtype=torch.float64), -c).numpy()
            rounded = ex.node("Floor", [ex.node("Mul", [scaled, ex.const("offset_shift", ch(shift))], "offset_shifted")],
                              "offset_rounded")
            clipped = ex.node("Clip", [rounded, ex.const("lo", np.float64(lo)), ex.const("hi", np.float64(hi))], "offset_clip")
        if not a["square"]:
            return clipped
        dtype = np.float64 if exact or not -128 <= lo <= hi <= 127 else np.float32
        return ex.node("Mul", [clipped, ex.const("template", square_template(a).numpy().astype(dtype))], "offset_square")

    def _onnx_columns(self, ex, op: Op, x, exact: bool):
        """uint8 codes [N, C·kh·kw, H_out, W_out] gathered at the offsets: the codes padded by one pixel of the
        zero-point, every position clamped into the padded image (outside lands on the border: zero), one Gather
        over the flattened images of the batch."""
        a = op.attrs
        offsets = self._onnx_offsets(ex, op, x, exact)
        _, c, h, w = ex.model_shapes[op.inputs[0]]
        _, _, oh, ow = ex.model_shapes[op.output]
        taps = a["kernel_size"][0] * a["kernel_size"][1]
        rows, cols = tap_positions(torch.zeros(1, 2 * taps, oh, ow, dtype=torch.int64), *_geometry(a), torch.int64)
        index = {}
        for name, first, base, size in (("rows", 0, rows, h), ("cols", 1, cols, w)):
            picked = ex.node("Gather", [offsets, ex.const(name, np.arange(first, 2 * taps, 2, dtype=np.int64))], name, axis=1)
            moved = ex.node("Cast", [picked], f"{name}_int", to=ex.TP.INT64)
            # +1: the padded image's coordinates; clamped to its border, which holds zero
            index[name] = ex.node("Clip", [ex.node("Add", [moved, ex.const("base", (base + 1).numpy())], "padded"),
                                           ex.const("first", np.int64(0)), ex.const("last", np.int64(size + 1))], "clamp")
        image = (h + 2) * (w + 2)
        flat = ex.node("Add", [ex.node("Mul", [index["rows"], ex.const("width", np.int64(w + 2))], "row_start"),
                               index["cols"]], "pixel")
        batch = ex.node("Slice", [ex.node("Shape", [x.name], "shape"), ex.const("zero", np.array([0], np.int64)),
                                  ex.const("one", np.array([1], np.int64))], "batch")
        image_start = ex.node("Mul", [ex.node("Range", [ex.const("start", np.int64(0)),
                                                        ex.node("Squeeze", [batch], "n"), ex.const("step", np.int64(1))],
                                              "images"), ex.const("image", np.int64(image))], "image_start")
        flat = ex.node("Add", [flat, ex.node("Reshape", [image_start, ex.const("nchw", np.array([-1, 1, 1, 1], np.int64))],
                                             "image_start4")], "global")
        flat = ex.node("Reshape", [flat, ex.const("vector", np.array([-1], np.int64))], "index")
        padded = ex.node("Pad", [x.name, ex.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
                                 ex.const("x_zp", np.uint8(x.zero_point))], "padded_codes")
        # channels last: each gathered pixel is one contiguous row of C codes
        pixels = ex.node("Reshape", [ex.node("Transpose", [padded], "channels_last", perm=[0, 2, 3, 1]),
                                     ex.const("rows_c", np.array([-1, c], np.int64))], "codes_by_pixel")
        gathered = ex.node("Gather", [pixels, flat], "gathered", axis=0)  # [N·taps·H_out·W_out, C]
        gathered = ex.node("Reshape", [gathered, ex.const("n_k_c", np.array([-1, taps * oh * ow, c], np.int64))], "by_image")
        columns = ex.node("Reshape", [ex.node("Transpose", [gathered], "channels_first", perm=[0, 2, 1]),
                                      ex.const("columns", np.array([-1, c * taps, oh, ow], np.int64))], "columns")
        return ex.tensor(columns, "codes", x.scale, x.zero_point)

    def _as_pointwise_conv(self, op: Op) -> Op:
        """The main conv as the grouped 1×1 conv over the gathered columns that the conv family emits."""
        w = op.tensors["weight"]
        tensors = {**op.tensors, "weight": w.reshape(w.shape[0], -1, 1, 1)}
        attrs = {**op.attrs, "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}
        return Op(op.kind, op.inputs, op.output, attrs, tensors, op.scale)

    def onnx(self, ex, op, ins):
        columns = self._onnx_columns(ex, op, ex.as_codes_input(ins[0], op), exact=True)
        return family_for_kind("conv2d").onnx(ex, self._as_pointwise_conv(op), [columns])

    def onnx_fast(self, ex, op, ins):
        # the offsets by one QLinearConv, the same gather, then the conv family's fused QLinearConv writing onto the
        # consumer's grid. ONNX Runtime's float DeformConv ran 10-15% faster on a 32×128×128 block
        # (bench/deform_onnx.py: 40.6 vs 44.5 ms, 1 thread) but needs opset 19, and this export is opset 17
        columns = self._onnx_columns(ex, op, ex.as_codes_input(ins[0], op), exact=False)
        return family_for_kind("conv2d").onnx_fast(ex, self._as_pointwise_conv(op), [columns])

    def latency_models(self, op, input_shape):
        raise ConfigError("the deformable conv is a graph of several ONNX nodes (offset conv, gather, conv), not one; "
                          "it has no one-node latency probe and cannot enter a latency table (plan by size or BOPs)")
