"""LayerNorm over the last dimensions, in integers only (I-BERT's integer mean, variance and square root).

The input is put on an 8- or 16-bit grid of its own (codes q, scale s): 16 bits carry a transformer's residual
stream, whose outlier channels an 8-bit grid cannot hold (I-BERT keeps it wider still). Over the N normalised elements, with S = Σq:

    D = N·q − S                      N times the deviation from the mean, exact
    T = Σ D² + E,  E = round(N³·ε / s²)   N³·(variance + ε) in codes², exact but for E's rounding
    σ = ⌊√T⌋                         by Newton's iteration on integers (no float square root)
    r = ⌊D·2^k / σ⌋                  the normalised value / √N, with k fraction bits

since (x − μ)/√(var + ε) = (D/N) / (√T/N^{3/2}) = √N·D/√T. The affine γ·(·) + β is a per-element weight: γ's
codes g = ±127 at scale |γ|/127 (exact), β as an integer at the accumulator's scale |γ|/127·√N·2^-k, so
acc = r·g + b; then one dyadic requantization onto the output grid. With 16-bit input codes and N ≤ 2^12 every
intermediate stays below 2^62, so int64 holds it: the integer model and the exact ONNX export (int64 ops, floor
division by ``a − Mod(a, b)``) compute it bit for bit.

The fake-quant module computes q_out(LayerNorm(q_in(x))) in float; the integer program differs from it only by
the two floors (relative 2^-k and 1/σ) and E's rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.ops._registry import QuantOp, register
from hessq.ops.quant import to_grid
from hessq.quantizer import ActQuantizer

FRACTION_BITS = 16
#: Newton iterations from 2^31 (above √T for every T below 2^62): each at least halves the excess until it is
#: small, then converges quadratically; 44 reach ⌊√T⌋ for every T < 2^62 (checked in the tests).
NEWTON_STEPS = 44
NEWTON_START = 2**31
#: T = Σ D² + E must stay below this: x + ⌊T/x⌋ in Newton's step then fits int64.
MAX_SQUARES = 2**62
MAX_ELEMENTS = 2**12
#: Input grids the integer LayerNorm takes.
INPUT_BITS = (8, 16)


def isqrt(t: torch.Tensor) -> torch.Tensor:
    """⌊√t⌋ of int64 ``t`` (1 ≤ t < 2^62), by Newton's iteration x ← min(x, ⌊(x + ⌊t/x⌋)/2⌋) from 2^31."""
    x = torch.full_like(t, NEWTON_START)
    for _ in range(NEWTON_STEPS):
        x = torch.minimum(x, (x + torch.div(t, x, rounding_mode="floor")) // 2)
    return x


class QuantLayerNorm(nn.Module):
    """Fake-quant LayerNorm over the last ``len(normalized_shape)`` dimensions: q_out(LN(q_in(x)))."""

    def __init__(self, normalized_shape, weight, bias, eps: float, input_quantizer: ActQuantizer,
                 output_quantizer: ActQuantizer) -> None:
        super().__init__()
        self.normalized_shape = tuple(normalized_shape)
        n = math.prod(self.normalized_shape)
        self.weight = nn.Parameter(weight.detach().clone() if weight is not None else torch.ones(self.normalized_shape))
        self.bias = nn.Parameter(bias.detach().clone() if bias is not None else torch.zeros(self.normalized_shape))
        self.eps = float(eps)
        if n > MAX_ELEMENTS:
            raise ConfigError(f"integer LayerNorm over {n} elements (at most {MAX_ELEMENTS})")
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(self.input_quantizer(x), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.output_quantizer(y)

    @torch.no_grad()
    def integer_affine(self, s_in: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(γ codes, β integers, the accumulator's scale, E) for an input grid of scale ``s_in``."""
        n = math.prod(self.normalized_shape)
        gamma = self.weight.double()
        g_scale = torch.where(gamma == 0, torch.ones_like(gamma), gamma.abs()) / 127
        codes = torch.round(gamma / g_scale)
        acc_scale = g_scale * math.sqrt(n) * 2.0**-FRACTION_BITS
        bias = torch.round(self.bias.double() / acc_scale)
        if bias.abs().max() >= 2**31:
            raise ConfigError("a LayerNorm shift too large for int32 at the normalised value's scale")
        e = int(round(n**3 * self.eps / s_in**2))
        return codes.to(torch.int64), bias.to(torch.int64), acc_scale, e


def _param(node: fx.Node, arg) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj = node.graph.owning_module
        for part in arg.target.split("."):
            obj = getattr(obj, part)
        return obj
    return arg


@register
class LayerNorm(QuantOp):
    name = "layer_norm"
    modules = (nn.LayerNorm, QuantLayerNorm)
    reads_residual = True
    functions = (F.layer_norm,)
    kinds = ("layer_norm",)

    def requantizing_module(self, node, new_quantizer):
        if node.op == "call_module":
            ln = node.graph.owning_module.get_submodule(node.target)
            if not isinstance(ln, nn.LayerNorm):
                return None
            shape, weight, bias, eps = ln.normalized_shape, ln.weight, ln.bias, ln.eps
        else:
            names = ("normalized_shape", "weight", "bias", "eps")
            p = dict(zip(names, node.args[1:]))
            p.update({k: v for k, v in node.kwargs.items() if k in names})
            shape, eps = p["normalized_shape"], p.get("eps", 1e-5)
            weight, bias = _param(node, p.get("weight")), _param(node, p.get("bias"))
            if isinstance(weight, fx.Node) or isinstance(bias, fx.Node):
                return None  # a computed weight: no integer form
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not isinstance(node.args[0], fx.Node):
            return None
        return QuantLayerNorm(shape, weight, bias, eps, new_quantizer(), new_quantizer()), (node.args[0],)

    def compile(self, program, node, m, args, kwargs):
        if not isinstance(m, QuantLayerNorm):
            program.fail(node, "a LayerNorm whose weight is computed")
        qi, qo = m.input_quantizer, m.output_quantizer
        if qi.bits not in INPUT_BITS:
            program.fail(node, f"an integer LayerNorm on {qi.bits}-bit codes (it takes {' or '.join(map(str, INPUT_BITS))}-bit "
                               "codes: set its input quantizer's bits to one of them)")
        v = to_grid(program, f"{node.name}_in", args[0], qi)
        gamma, beta, acc_scale, e = m.integer_affine(float(qi.scale))
        n = math.prod(m.normalized_shape)
        if n**3 * max(-qi.qmin, qi.qmax) ** 2 * 4 + e >= MAX_SQUARES:
            program.fail(node, f"an integer LayerNorm over {n} elements with ε = {m.eps:g} on a grid of step {float(qi.scale):.3g}")
        dims = list(range(-len(m.normalized_shape), 0))
        attrs = {"dims": dims, "eps_codes": e, "count": n}
        acc = program.emit(f"{node.name}_acc", "layer_norm", [v], v.dummy, acc_scale, 2**31, attrs,
                           {"weight": gamma, "bias": beta})
        return to_grid(program, node.name, acc, qo)

    def execute(self, op, inputs, kernel):
        a, t = op.attrs, op.tensors
        q = inputs[0]
        d = a["count"] * q - q.sum(a["dims"], keepdim=True)
        total = (d * d).sum(a["dims"], keepdim=True) + a["eps_codes"]
        sigma = isqrt(total.clamp(min=1))
        r = torch.div(d * 2**FRACTION_BITS, sigma, rounding_mode="floor")
        return r * t["weight"] + t["bias"]

    def onnx(self, ex, op, ins):
        # int64 throughout: with 16-bit input codes Σ D² passes 2^53, where float64 stops being exact
        a, t = op.attrs, op.tensors
        i64 = np.int64
        q = ex.node("Cast", [ex.acc(ins[0])], "codes_i64", to=ex.TP.INT64)
        axes = ex.const("axes", np.array(a["dims"], i64))

        def floor_div(x: str, y: str) -> str:  # ⌊x/y⌋ for y > 0 (Div truncates towards zero; Mod takes y's sign)
            return ex.node("Div", [ex.node("Sub", [x, ex.node("Mod", [x, y], "mod")], "less_mod"), y], "div")

        total_q = ex.node("ReduceSum", [q, axes], "sum_q", keepdims=1)
        d = ex.node("Sub", [ex.node("Mul", [q, ex.const("n", i64(a["count"]))], "nq"), total_q], "dev")
        ss = ex.node("ReduceSum", [ex.node("Mul", [d, d], "dev2"), axes], "sum_dev2", keepdims=1)
        total = ex.node("Max", [ex.node("Add", [ss, ex.const("eps", i64(a["eps_codes"]))], "plus_eps"),
                                ex.const("one", i64(1))], "at_least_one")
        x = ex.node("Expand", [ex.const("start", i64(NEWTON_START)), ex.node("Shape", [total], "shape")], "x0")
        two = ex.const("two", i64(2))
        for _ in range(NEWTON_STEPS):  # every operand positive: Div is the floor
            step = ex.node("Div", [ex.node("Add", [x, ex.node("Div", [total, x], "t_over_x")], "newton"), two], "halve")
            x = ex.node("Min", [x, step], "isqrt")
        r = floor_div(ex.node("Mul", [d, ex.const("frac", i64(2**FRACTION_BITS))], "scaled_dev"), x)
        acc = ex.node("Add", [ex.node("Mul", [r, ex.const("gamma", t["weight"].numpy().astype(i64))], "times_gamma"),
                              ex.const("beta", t["bias"].numpy().astype(i64))], "plus_beta")
        return ex.tensor(ex.node("Cast", [acc], "acc_f64", to=ex.TP.DOUBLE), "acc")

    def fast_reads_real(self, op):
        return True

    def onnx_fast(self, ex, op, ins):
        # ONNX Runtime's float LayerNormalization on the dequantized codes, with the real γ and β
        t, a = op.tensors, op.attrs
        n = a["count"]
        shape = list(t["weight"].shape)
        gamma = (t["weight"].double() * op.scale.double() * 2**FRACTION_BITS / math.sqrt(n)).numpy()
        beta = (t["bias"].double() * op.scale.double()).numpy()
        eps = float(a["eps_codes"]) * float(ins[0].scale) ** 2 / n**3 if a["eps_codes"] else 0.0
        y = ex.node("LayerNormalization", [ex.real(ins[0]), ex.const("gamma", gamma.astype(np.float32).reshape(shape)),
                                           ex.const("beta", beta.astype(np.float32).reshape(shape))],
                    "layernorm", axis=a["dims"][0], epsilon=eps)
        return ex.tensor(y, "real")
