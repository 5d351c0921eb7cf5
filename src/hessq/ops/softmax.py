"""Softmax over the last dimension, with an optional keep-mask (attention), and its integer form.

Fake quantization: q_out(masked_softmax(q_in(x), keep)); the input on an 8-bit grid of its own (scale s, calibrated),
the output on the unsigned 8-bit grid of the fixed range [0, 1] (step 1/255): probabilities need no calibration,
and a fixed grid lets the attention·V matmul after it read the codes as they are.

The integer form (shared with :mod:`hessq.ops.attention`): with c_j the input codes of a row and m the largest kept
one,

    e_j = E[c_j − m] for kept j, 0 for masked j,   E[i] = round(2^16 · exp(s·i))   (i = −span … 0)
    p_j = ⌊(2·qmax·e_j + Σe) / (2·max(Σe, 1))⌋       the probability on the grid of step 1/qmax

so a masked key gets probability code 0 and a row with nothing kept is all zeros, as :func:`masked_softmax` gives.
Every value is an integer below 2^52, so the exact ONNX export computes it in float64 bit for bit.

The fast export runs ONNX Runtime's float Softmax on the dequantized score codes, a masked key's score put
``MASKED_BELOW`` below the grid's lowest first: probabilities within float32 rounding of exp(s·(c_j − m)) / Σ,
against the integer form's 2^-16 table, quantized onto the 1/255 grid (round half to even, where the integer form
floors (2·qmax·e + Σe) / (2Σe), i.e. rounds half up), and a masked key weighs at most e^-30 of the largest instead
of 0. A row with every key masked (a text of padding only) gets uniform probabilities instead of zeros.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hessq.ops._program import Value
from hessq.ops._registry import QuantOp, register
from hessq.ops.mask import is_index
from hessq.ops.quant import to_grid
from hessq.quantizer import ActQuantizer

#: Fraction bits of the exponential table.
EXP_BITS = 16
#: The probability grid: codes 0 … 255 for [0, 1].
PROBABILITY_MAX = 255
#: Largest input grid the exponential table is built for.
MAX_TABLE_BITS = 16


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """``softmax(scores)`` over ``dim`` where only positions with ``keep`` True take part (padding gets 0).

    The attention form of softmax: a masked position contributes exp(-inf) = 0, as in Hugging Face's
    additive mask of the dtype's smallest value. A row with nothing kept gives zeros rather than NaN.
    """
    if keep is None:
        return torch.softmax(scores, dim)
    filled = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim) * keep


def exp_table(scale: float, span: int) -> torch.Tensor:
    """E[i + span] = round(2^16 · exp(scale · i)) for i = −span … 0 (int64)."""
    return torch.round(2.0**EXP_BITS * torch.exp(scale * torch.arange(-span, 1, dtype=torch.float64))).to(torch.int64)


def softmax_codes(c: torch.Tensor, table: torch.Tensor, span: int, qmax: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Probability codes (step 1/qmax) of the int64 score codes ``c`` over the last dimension (module docstring)."""
    if keep is None:
        e = table[c - c.amax(-1, keepdim=True) + span]
    else:
        keep = keep.expand(c.shape)
        top = torch.where(keep, c, torch.full_like(c, -(2**62))).amax(-1, keepdim=True)
        e = table[torch.where(keep, c - top, torch.zeros_like(c)) + span] * keep
    total = e.sum(-1, keepdim=True)
    return torch.div(2 * qmax * e + total, 2 * total.clamp(min=1), rounding_mode="floor")


#: How far below the lowest score on the grid a masked key's score is put in the fast export: its weight is at most
#: e^-30 ≈ 1e-13 of the row's largest, so with up to 4096 keys no probability code moves but where a kept probability
#: lies within 1e-9 of a rounding boundary. Far lower scores would be exactly 0 but send ONNX Runtime's Softmax down
#: a path ten times slower (exp of arguments below about -80).
MASKED_BELOW = 30.0
#: A masked key's score when the scores' range is not known (a value not clipped to its grid).
MASKED_SCORE = -1.0e9


def onnx_fast_softmax(ex, op, scores, keep: str | None) -> object:
    """Fast ONNX of a (masked) softmax over the last dimension: the probability codes of ``op``'s grid from the score
    value ``scores``."""
    x = ex.real(scores)
    if keep is not None:
        # the scores' range: the (uint8) grid's, or the Clip's that put them in it
        low = high = None
        if scores.kind == "codes":
            low, high = -scores.zero_point * scores.scale, (255 - scores.zero_point) * scores.scale
        elif scores.clipped_from:
            low, high = scores.clip_range
        # an additive mask, built on the small (B, 1, 1, T) keep and broadcast: a Where over all B × heads × T²
        # scores took 4× the Softmax's time (BERT at T=256, batch 32). Dropping a key by the range plus
        # MASKED_BELOW puts its score at most low − MASKED_BELOW, as before (and at least low − range − MASKED_BELOW:
        # on BERT at T=256 these arguments did not slow ONNX Runtime's Softmax).
        drop = MASKED_SCORE if low is None else -(high - low) - MASKED_BELOW
        bias = ex.node("Where", [keep, ex.const("kept", np.float32(0)), ex.const("dropped", np.float32(drop))],
                       "mask_bias")
        x = ex.node("Add", [x, bias], "masked_scores")
    p = ex.node("Softmax", [x], "softmax", axis=-1)
    if op.attrs["qmax"] > 255:  # a probability grid wider than uint8 codes: real values, the requantize after rounds
        return ex.tensor(p, "real")
    return ex.codes(p, float(op.scale), False, "probability")


def onnx_softmax_codes(ex, op, c: str, keep: str | None) -> object:
    """Exact ONNX of :func:`softmax_codes` on float64 integers ``c`` (``keep``: a bool mask, or None)."""
    f64 = np.float64
    if keep is not None:
        keep_f = ex.node("Cast", [keep], "keep_f64", to=ex.TP.DOUBLE)
        c_kept = ex.node("Where", [keep, c, ex.const("far", f64(-(2.0**62)))], "kept_scores")
    top = ex.node("ReduceMax", [c if keep is None else c_kept], "row_max", axes=[-1], keepdims=1)
    shifted = ex.node("Sub", [c, top], "from_max")
    if keep is not None:
        shifted = ex.node("Where", [keep, shifted, ex.const("zero", f64(0))], "masked_from_max")
    index = ex.node("Add", [shifted, ex.const("span", f64(op.attrs["span"]))], "index")
    e = ex.node("Gather", [ex.const("exp", op.tensors["table"].numpy().astype(f64)),
                           ex.node("Cast", [index], "index_i64", to=ex.TP.INT64)], "exp", axis=0)
    if keep is not None:
        e = ex.node("Mul", [e, keep_f], "masked_exp")
    total = ex.node("ReduceSum", [e, ex.const("axes", np.array([-1], np.int64))], "row_sum", keepdims=1)
    numerator = ex.node("Add", [ex.node("Mul", [e, ex.const("twice_qmax", f64(2 * op.attrs["qmax"]))], "scaled"), total],
                        "numerator")
    at_least_one = ex.node("Max", [total, ex.const("one", f64(1))], "at_least_one")
    p = ex.node("Floor", [ex.node("Div", [numerator, ex.node("Add", [at_least_one, at_least_one], "twice_sum")], "ratio")],
                "floor")
    if op.attrs["qmax"] > 255:
        return ex.tensor(p, "acc")
    return ex.tensor(ex.node("Cast", [p], "probability", to=ex.TP.UINT8), "codes", float(op.scale), 0)


class QuantSoftmax(nn.Module):
    """Fake-quant (masked) softmax: q_out(masked_softmax(q_in(x), keep)), q_out on [0, 1]."""

    def __init__(self, input_quantizer: ActQuantizer, output_quantizer: ActQuantizer, dim: int = -1) -> None:
        super().__init__()
        self.input_quantizer, self.output_quantizer, self.dim = input_quantizer, output_quantizer, dim

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.output_quantizer(masked_softmax(self.input_quantizer(x), keep, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


@register
class Softmax(QuantOp):
    name = "softmax"
    modules = (QuantSoftmax, nn.Softmax)
    functions = (masked_softmax, torch.softmax, F.softmax)
    methods = ("softmax",)
    canonical = masked_softmax
    kinds = ("masked_softmax",)
    output_range = (0.0, 1.0)

    def canonical_call(self, node, module):
        if isinstance(module, QuantSoftmax):
            return None
        if module is not None:
            return ((node.args[0], None, module.dim), {}) if module.dim is not None else None
        if node.target is masked_softmax:
            names = ("scores", "keep", "dim")
            p = dict(zip(names, node.args))
            p.update({k: v for k, v in node.kwargs.items() if k in names})
            return (p["scores"], p.get("keep"), p.get("dim", -1)), {}
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None or node.kwargs.get("dtype") is not None:
            return None  # an implicit dimension or a dtype change keeps its form (and has no quantized form)
        return (node.args[0], None, dim), {}

    def requantizing_module(self, node, new_quantizer):
        if node.target is not masked_softmax or node.kwargs or len(node.args) != 3:
            return None
        scores, keep, dim = node.args
        if not isinstance(scores, fx.Node) or not isinstance(dim, int):
            return None
        module = QuantSoftmax(new_quantizer(), new_quantizer((0.0, 1.0)), dim)
        return module, (scores,) if keep is None else (scores, keep)

    def compile(self, program, node, m, args, kwargs):
        if not isinstance(m, QuantSoftmax):
            program.fail(node, "a softmax over an implicit dimension or to another dtype")
        qi, qo = m.input_quantizer, m.output_quantizer
        v = args[0]
        ndim = v.dummy.dim() if isinstance(v, Value) else 0
        if m.dim not in (-1, ndim - 1):
            program.fail(node, "a softmax over a dimension other than the last")
        if qi.bits > MAX_TABLE_BITS:
            program.fail(node, f"a softmax of {qi.bits}-bit scores")
        if bool(qo.signed) or abs(float(qo.scale) * qo.qmax - 1) > 1e-6:
            program.fail(node, "probabilities on a grid other than [0, 1]")
        codes = to_grid(program, f"{node.name}_in", v, qi)
        inputs = [codes]
        if len(args) > 1:
            keep = args[1]
            if not isinstance(keep, Value) or not is_index(keep) or keep.dummy.dtype != torch.bool:
                program.fail(node, "a softmax mask that is not a bool mask computed from the ids")
            torch.broadcast_shapes(keep.dummy.shape, codes.dummy.shape)
            inputs.append(keep)
        span = qi.qmax - qi.qmin
        # a stand-in's values are not the codes' (only its shape and dtype are): clipped to the grid, the table
        # lookup stays in range whatever ops made it
        dummy = softmax_codes(codes.dummy.clamp(qi.qmin, qi.qmax), exp_table(float(qi.scale), span), span, qo.qmax,
                              inputs[1].dummy if len(inputs) > 1 else None)
        return program.emit(node.name, "masked_softmax", inputs, dummy, qo.scale.double(), qo.qmax,
                            {"span": span, "qmax": qo.qmax}, {"table": exp_table(float(qi.scale), span)})

    def execute(self, op, inputs, kernel):
        keep = inputs[1] if len(inputs) > 1 else None
        return softmax_codes(inputs[0], op.tensors["table"], op.attrs["span"], op.attrs["qmax"], keep)

    def onnx(self, ex, op, ins):
        return onnx_softmax_codes(ex, op, ex.acc(ins[0]), ins[1].name if len(ins) > 1 else None)

    def fast_reads_real(self, op):
        return True

    def onnx_fast(self, ex, op, ins):
        return onnx_fast_softmax(ex, op, ins[0], ins[1].name if len(ins) > 1 else None)
