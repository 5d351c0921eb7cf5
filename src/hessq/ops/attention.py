"""nn.MultiheadAttention (self-attention, batch first, no masks: ViT's encoder) in integers only.

The module quantizes its input; the packed input projection and the output projection are 8-bit per-channel
weights with int32 biases (like a standalone BatchNorm's affine, they take no bits from the plan); q, k and v go
on grids of their own; the scores q·kᵀ are an integer matmul of codes whose scale takes 1/√d in; softmax runs
on an 8-bit grid of the scores by a table and an integer division:

    c_j   the score codes of a row, m = max_j c_j
    e_j = E[c_j − m],  E[i] = round(2^16 · exp(s·i))   (i = −254 … 0)
    p_j = ⌊(2·255·e_j + Σe) / (2·Σe)⌋                    the probability on the [0, 1] grid of step 1/255

and the context p·v is another integer matmul. Every value is an exact integer below 2^52, so the exact ONNX
export (MatMulInteger, a Gather, float64 divisions that floor exactly) reproduces it bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hessq.ops._program import Value
from hessq.ops._registry import QuantOp, family_for_kind, register
from hessq.ops._weighted import WeightCodes
from hessq.ops.quant import to_grid
from hessq.ops.shape import _full_scale
from hessq.ops.softmax import PROBABILITY_MAX, exp_table, onnx_fast_softmax, onnx_softmax_codes, softmax_codes


class _Projection(WeightCodes, nn.Module):
    """A linear projection inside the attention: 8-bit per-channel weight codes, int32 bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_quantizer) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._init_quant(8, input_quantizer.bits, "channel", 1)
        self.set_input_quantizer(input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_weight_and_bias()
        return F.linear(x, w, b)


class QuantMultiheadAttention(nn.Module):
    """Fake-quant self-attention; returns ``(output, None)`` as ``nn.MultiheadAttention`` with need_weights=False."""

    def __init__(self, mha: nn.MultiheadAttention, new_quantizer) -> None:
        super().__init__()
        self.num_heads, self.embed_dim = mha.num_heads, mha.embed_dim
        self.input_quantizer = new_quantizer()
        self.q_quantizer, self.k_quantizer, self.v_quantizer = new_quantizer(), new_quantizer(), new_quantizer()
        self.score_quantizer = new_quantizer()
        self.probability_quantizer = new_quantizer((0.0, 1.0))
        self.context_quantizer = new_quantizer()
        self.output_quantizer = new_quantizer()
        self.in_proj = _Projection(mha.in_proj_weight, mha.in_proj_bias, self.input_quantizer)
        self.out_proj = _Projection(mha.out_proj.weight, mha.out_proj.bias, self.context_quantizer)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        n, tokens, _ = t.shape
        return t.reshape(n, tokens, self.num_heads, -1).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor):
        n, tokens, _ = x.shape
        q, k, v = self.in_proj(self.input_quantizer(x)).chunk(3, -1)
        q, k, v = (self._heads(quant(t)) for quant, t in
                   ((self.q_quantizer, q), (self.k_quantizer, k), (self.v_quantizer, v)))
        scores = self.score_quantizer(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
        p = self.probability_quantizer(torch.softmax(scores, -1))
        context = (p @ v).permute(0, 2, 1, 3).reshape(n, tokens, self.embed_dim)
        return self.output_quantizer(self.out_proj(self.context_quantizer(context))), None


@register
class MultiheadAttention(QuantOp):
    name = "multihead_attention"
    modules = (nn.MultiheadAttention, QuantMultiheadAttention)
    kinds = ("attn_linear", "matmul", "softmax")
    channel_dim = -1  # the projections' features are the last dimension

    def requantizing_module(self, node, new_quantizer):
        mha = node.graph.owning_module.get_submodule(node.target)
        if not isinstance(mha, nn.MultiheadAttention):
            return None
        args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value") if k in node.kwargs]
        extra = {k: v for k, v in node.kwargs.items() if k not in ("query", "key", "value")}
        plain = (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn
                 and len(args) == 3 and args[0] is args[1] is args[2] and isinstance(args[0], fx.Node)
                 and extra.get("need_weights", True) is False
                 and all(extra.get(k) is None for k in ("key_padding_mask", "attn_mask"))
                 and not extra.get("is_causal", False))
        if not plain:
            return None
        return QuantMultiheadAttention(mha, new_quantizer), (args[0],)

    def compile(self, program, node, m, args, kwargs):
        if not isinstance(m, QuantMultiheadAttention):
            program.fail(node, "multi-head attention other than batch-first self-attention without masks or weights")
        linear = family_for_kind("linear")
        name, heads = node.name, m.num_heads
        x = to_grid(program, f"{name}_in", args[0], m.input_quantizer)
        qkv = linear.emit_accumulator(program, f"{name}_qkv", m.in_proj, x, "attn_linear")
        n, tokens, width = qkv.dummy.shape
        d = m.embed_dim // heads

        def part(i: int, quantizer, perm: list[int]) -> Value:
            start, end = i * m.embed_dim, (i + 1) * m.embed_dim
            piece = program.emit(f"{name}_part{i}", "slice", [qkv], qkv.dummy.narrow(2, start, end - start),
                                 _full_scale(qkv, lambda t: t.narrow(2, start, end - start)), qkv.qmax,
                                 {"dim": 2, "start": start, "end": end})
            codes = to_grid(program, f"{name}_part{i}_q", piece, quantizer)
            shaped = program.emit(f"{name}_part{i}_heads", "reshape", [codes], codes.dummy.reshape(n, tokens, heads, d),
                                  codes.scale, codes.qmax, {"shape": [-1, tokens, heads, d]})
            return program.emit(f"{name}_part{i}_perm", "permute", [shaped], shaped.dummy.permute(perm), codes.scale,
                                codes.qmax, {"perm": perm})

        q = part(0, m.q_quantizer, [0, 2, 1, 3])
        k = part(1, m.k_quantizer, [0, 2, 3, 1])
        v = part(2, m.v_quantizer, [0, 2, 1, 3])
        scores = program.emit(f"{name}_scores", "matmul", [q, k], q.dummy @ k.dummy, q.scale * k.scale / math.sqrt(d),
                              q.qmax * k.qmax * d)
        codes = to_grid(program, f"{name}_scores_q", scores, m.score_quantizer)
        s, pq = m.score_quantizer, m.probability_quantizer
        span = s.qmax - s.qmin
        p = program.emit(f"{name}_softmax", "softmax", [codes], codes.dummy, pq.scale.double(), PROBABILITY_MAX,
                         {"span": span, "qmax": pq.qmax}, {"table": exp_table(float(s.scale), span)})
        if pq.qmax != PROBABILITY_MAX or abs(float(pq.scale) * PROBABILITY_MAX - 1) > 1e-6:
            program.fail(node, "attention probabilities on a grid other than 8-bit [0, 1]")
        context = program.emit(f"{name}_context", "matmul", [p, v], p.dummy @ v.dummy, p.scale * v.scale,
                               PROBABILITY_MAX * v.qmax * tokens)
        context = to_grid(program, f"{name}_context_q", context, m.context_quantizer)
        merged = program.emit(f"{name}_merge", "permute", [context], context.dummy.permute(0, 2, 1, 3), context.scale,
                              context.qmax, {"perm": [0, 2, 1, 3]})
        merged = program.emit(f"{name}_merged", "reshape", [merged], merged.dummy.reshape(n, tokens, m.embed_dim),
                              merged.scale, merged.qmax, {"shape": [-1, tokens, m.embed_dim]})
        out = linear.emit_accumulator(program, f"{name}_out", m.out_proj, merged, "attn_linear")
        return to_grid(program, name, out, m.output_quantizer), None

    def execute(self, op, inputs, kernel):
        if op.kind == "attn_linear":
            return family_for_kind("linear").execute(op, inputs, kernel)
        if op.kind == "matmul":
            return inputs[0] @ inputs[1]
        return softmax_codes(inputs[0], op.tensors["table"], op.attrs["span"], op.attrs["qmax"])

    def onnx(self, ex, op, ins):
        if op.kind == "attn_linear":
            return family_for_kind("linear").onnx(ex, op, ins)
        if op.kind == "matmul":
            a, b = ins
            zps = [ex.const("zp", np.uint8(t.zero_point)) for t in (a, b)]
            product = ex.node("MatMulInteger", [a.name, b.name, *zps], "matmul")
            return ex.tensor(ex.node("Cast", [product], "matmul_f64", to=ex.TP.DOUBLE), "acc")
        return onnx_softmax_codes(ex, op, ex.acc(ins[0]), None)

    def fast_reads_real(self, op):
        return op.kind == "softmax"

    def onnx_fast(self, ex, op, ins):
        if op.kind == "attn_linear":
            return family_for_kind("linear").onnx_fast(ex, op, ins)
        if op.kind == "matmul":
            # the exact integer products of the codes, scaled to real values in the same kernel, which also takes
            # the scores' 1/√d (a rescale that alone reads them) into its scale
            a, b = ins
            rescale = ex.sole_user(op, "rescale")
            factor = float(rescale.tensors["factor"]) if rescale is not None and rescale.tensors["factor"].dim() == 0 else 1.0
            inputs = [a.name, b.name, ex.const("a_scale", np.float32(a.scale)),
                      ex.const("b_scale", np.float32(b.scale * factor)),
                      ex.const("a_zp", np.uint8(a.zero_point)), ex.const("b_zp", np.uint8(b.zero_point))]
            y = ex.tensor(ex.node("MatMulIntegerToFloat", inputs, "matmul", domain="com.microsoft"), "real")
            if factor != 1.0:
                ex.fused.add(rescale.output)
                ex.values[rescale.output] = y
            return y
        return onnx_fast_softmax(ex, op, ins[0], None)
