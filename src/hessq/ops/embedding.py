"""Embedding tables (``nn.Embedding``): a quantizable layer whose input is token ids, a lookup with no MACs.

Each row r of the table W has its own symmetric scale s_r = c_r·max|W_r| / (2^(b-1) − 1), its clip c_r ≤ 1 chosen
for the row's least squared rounding error (or the scale of its group of rows: Q-BERT's groups, ``num_groups``
contiguous groups; the last one is shorter when the rows do not divide evenly), codes q_r = clamp(round(W_r / s_r)). A lookup's result varies its scale with the token, so the twin puts
it on an activation grid of its own (scale S): the fake-quant output is q_out(q_r · s_r), and the integer program
gathers the codes of each id's row with that row's dyadic multiplier b_r / 2^c_r ≈ s_r / S and requantizes:

    out = clamp((q_r · b_r + 2^(c_r − 1)) >> c_r)

A plan's row tiers (:func:`hessq.plan_bits` with ``row_usage``) give rows widths of their own (b_r bits for row r,
:meth:`RowQuantizer.set_row_bits`): each row is still one scale and one row of codes, so nothing below changes.

Lookups with constant ids (BERT's positions ``arange(T)`` and token types ``zeros``) are computed while compiling
by the same arithmetic, and enter the program as constant codes.

The fast ONNX export gathers precomputed output codes (uint8, bit for bit), or for a table of at most 4-bit codes
keeps it packed and looks it up with com.microsoft's GatherBlockQuantized.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.ops._program import Value
from hessq.ops._registry import register
from hessq.ops._weighted import QuantLayer, WeightedOp
from hessq.ops.mask import is_index
from hessq.quantizer import (ActQuantizer, WeightQuantizer, dyadic, fake_quantize, least_squares_clip, qrange, requantize,
                             symmetric_scale)


class RowQuantizer(WeightQuantizer):
    """A table's weight quantizer: one scale per row ([V]; each row its group's with ``granularity='group'``),
    or one per table (``'tensor'``), clipped for the least squared error of each row (or group, or table).

    A lookup copies a row, so the row's squared rounding error is the output's: the least-squares clip is the best
    scale for what the next layer sees. (A Linear's output error weighs each weight by its input, and BERT's inputs
    have outlier features, so Linears keep max |w|.) At 2 bits it is what makes a table usable: on the tweets
    MiniLM, the word table alone at 2 bits costs 17.5 points of accuracy with max |w| rows and none with this clip.

    The search (:func:`least_squares_clip`) runs once per weight version; in training mode the last ratios are
    reused while the weight moves (a step changes them little), and eval mode searches again for the new weight,
    so the eval forward and the integer model always share one scale.
    """

    def __init__(self, bits: int, granularity: str = "channel", num_groups: int = 1) -> None:
        super().__init__(bits, "channel" if granularity == "block" else granularity, num_groups)
        self._clip: tuple[tuple, torch.Tensor] | None = None  # (weight key, ratio per unit): derived, not state
        #: Each row's own width ([V] int8), or None: every row at ``bits`` (see :meth:`set_row_bits`).
        self.register_buffer("row_bits", None)

    def set_row_bits(self, row_bits: torch.Tensor | None) -> None:
        """Give each row its own width (a plan's row tiers: the rows of frequent tokens wider than the rest).

        Each row keeps its own scale, at its own width, so a lookup still copies one row's codes and scale.
        """
        if row_bits is not None:
            if self.granularity != "channel":
                raise ConfigError(f"rows of their own widths need one scale per row (granularity 'channel'), not "
                                  f"{self.granularity!r}")
            row_bits = torch.as_tensor(row_bits).detach()
            if row_bits.dim() != 1 or row_bits.is_floating_point() or not bool(((row_bits >= 2) & (row_bits <= 8)).all()):
                raise ConfigError("row bits must be a vector of integer widths from 2 to 8, one per table row")
            row_bits = row_bits.to(torch.int8)
        self.row_bits = row_bits
        self._clip = None

    def _widths(self, weight: torch.Tensor) -> torch.Tensor | None:
        if self.row_bits is None:
            return None
        if self.row_bits.numel() != weight.shape[0]:
            raise ConfigError(f"row bits for {self.row_bits.numel()} rows given to a table of {weight.shape[0]} rows")
        return self.row_bits.to(weight.device)

    def code_bounds(self, weight: torch.Tensor) -> tuple[int | torch.Tensor, int | torch.Tensor]:
        widths = self._widths(weight)
        if widths is None:
            return qrange(self.bits, signed=True)
        qmax = (torch.ones((), dtype=torch.long, device=weight.device) << (widths.long() - 1)) - 1
        qmax = qmax.to(weight.dtype).unsqueeze(1)  # symmetric: [-(2^(b-1) - 1), 2^(b-1) - 1], as qrange
        return -qmax, qmax

    def _units(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """(max |w| per unit, unit of each row or None for one per row, rows per group or None)."""
        row_max = weight.detach().abs().amax(1)
        rows = weight.shape[0]
        if self.granularity == "tensor":
            return row_max.amax().reshape(1), torch.zeros(rows, dtype=torch.long, device=weight.device), None
        if self.granularity != "group":
            return row_max, None, None
        per = -(-rows // min(self.num_groups, rows))  # rows per group, the last group shorter
        padded = F.pad(row_max, (0, per * -(-rows // per) - rows))
        unit = torch.arange(rows, device=weight.device) // per
        return padded.reshape(-1, per).amax(1), unit, per

    def _search(self, weight: torch.Tensor, absmax: torch.Tensor, unit: torch.Tensor | None) -> torch.Tensor:
        widths = self._widths(weight)
        if widths is None:
            return least_squares_clip(weight.flatten(1), absmax, self.bits, unit)
        ratio = torch.ones_like(absmax, dtype=torch.float32)
        for b in widths.unique().tolist():  # each width's rows searched on its own grid
            rows = widths == b
            ratio[rows] = least_squares_clip(weight.flatten(1)[rows], absmax[rows], b)
        return ratio

    def _ratio(self, weight: torch.Tensor, absmax: torch.Tensor, unit: torch.Tensor | None) -> torch.Tensor:
        try:
            widths = self.row_bits  # (a state-dict load writes the row widths in place: their version moves)
            key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device, self.bits,
                   self.granularity, self.num_groups, None if widths is None else (widths.data_ptr(), widths._version))
        except RuntimeError:  # an inference-mode tensor has no version: search every time
            return self._search(weight, absmax, unit)
        cached = self._clip
        if cached is not None and (cached[0] == key or (self.training and cached[0][2:] == key[2:])):
            return cached[1]
        ratio = self._search(weight, absmax, unit)
        self._clip = (key, ratio)
        return ratio

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        absmax, unit, per = self._units(weight)
        widths = self._widths(weight)
        if widths is not None:  # each row's scale at its own width
            clipped = absmax * self._ratio(weight, absmax, unit)
            scale = torch.empty_like(clipped)
            for b in widths.unique().tolist():
                scale[widths == b] = symmetric_scale(clipped[widths == b], b)
            return scale
        scale = symmetric_scale(absmax * self._ratio(weight, absmax, unit), self.bits)
        if self.granularity == "tensor":
            return scale.reshape(())
        return scale if per is None else scale.repeat_interleave(per)[: weight.shape[0]]


class QuantEmbedding(QuantLayer):
    """Embedding with a quantized table; its lookups go onto the grid of ``output_quantizer``."""

    #: The input is ids, not an activation: the rewrite quantizes nothing before it.
    index_input = True

    def __init__(self, embedding: nn.Embedding, w_bits: int, a_bits: int, granularity: str = "channel", num_groups: int = 1) -> None:
        super().__init__()
        if embedding.max_norm is not None:
            raise ConfigError("an nn.Embedding with max_norm renormalises its rows on every lookup; hessq quantizes "
                              "tables without max_norm (renormalise the weight once and set max_norm=None)")
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = nn.Parameter(embedding.weight.detach().clone())
        self.bias = None
        self._init_quant(w_bits, a_bits, granularity, num_groups)
        self.weight_quantizer = RowQuantizer(w_bits, granularity, num_groups)
        self.output_quantizer = ActQuantizer(a_bits)  # the rewrite gives it its range settings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self.output_quantizer(F.embedding(ids, self.weight_quantizer(self.weight), self.padding_idx))
        # Without a graph, only the rows looked up are rounded (each row on its own scale, so the numbers are the
        # same): a batch of BERT reads a few thousand of the word table's 30,522 rows.
        qmin, qmax = self.weight_quantizer.code_bounds(self.weight)
        if isinstance(qmax, torch.Tensor):  # rows of their own widths: each looked-up row's own bounds
            qmin, qmax = F.embedding(ids, qmin), F.embedding(ids, qmax)
        row_scale = self._row_scales(self.weight_quantizer.scale(self.weight)).unsqueeze(1)
        rows = fake_quantize(F.embedding(ids, self.weight), F.embedding(ids, row_scale), qmin, qmax)
        return self.output_quantizer(rows)

    def _row_scales(self, scale: torch.Tensor) -> torch.Tensor:
        """One scale per table row ([V]) from the weight quantizer's ([] per table, [V] per row or row group)."""
        return scale.expand(self.num_embeddings) if scale.dim() == 0 else scale

    @torch.no_grad()
    def integer_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int64 codes [V, D], b [V, 1], c [V, 1]): each row's codes and its dyadic multiplier onto the output grid."""
        codes, scale = self.integer_weight()
        b, c = dyadic(self._row_scales(scale) / self.output_quantizer.scale.double())
        return codes, b.unsqueeze(1), c.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, w_bits={self.w_bits}, a_bits={self.a_bits}"


def lookup(ids: torch.Tensor, codes: torch.Tensor, b: torch.Tensor, c: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer lookup: each id's row of codes requantized by that row's dyadic multiplier."""
    ids = ids.long()
    return requantize(codes[ids], b[ids], c[ids], qmin, qmax)


def _gather_block(width: int) -> int:
    """GatherBlockQuantized's block along a row of ``width``: the largest power of two from 16 to 128 dividing it, or
    0 when none does (the fast export then stores the table as uint8 output codes)."""
    return next((b for b in (128, 64, 32, 16) if width % b == 0), 0)


@register
class Embedding(WeightedOp):
    name = "embedding"
    modules = (nn.Embedding,)
    kinds = ("embedding",)
    twin = QuantEmbedding
    channel_dim = -1
    # BERT sums its word, position and token-type lookups, but each lookup is on its own grid before the add and
    # the tables differ a thousandfold in size: tied, the word table's 2 bits would drag the position table (every
    # position in every text) and the token-type row (added to every token) down to 2 bits too, which costs 4.5
    # points on tweets for 24 KB
    tied_at_add = False

    def quantized_module(self, module, w_bits, a_bits, granularity, num_groups, block_size: int = 128):
        # Input-column blocks would cut each row into pieces: a table is quantized per row ("block" included).
        return QuantEmbedding(module, w_bits, a_bits, granularity, num_groups)

    def weight_quantizer(self, bits, granularity="channel", num_groups=1, block_size=128):
        return RowQuantizer(bits, granularity, num_groups)

    def macs(self, module, inputs, output):
        return 0  # a lookup multiplies nothing

    def compile(self, program, node, m, args, kwargs):
        ids = args[0]
        q = m.output_quantizer
        codes, b, c = m.integer_rows()
        bound = max(-q.qmin, q.qmax)
        if isinstance(ids, torch.Tensor):  # constant ids: the lookup is a constant of the program
            out = lookup(ids, codes, b, c, q.qmin, q.qmax)
            out = out.reshape([1] * max(0, 3 - out.dim()) + list(out.shape)) if out.dim() < 3 else out
            if out.shape[0] != 1:
                program.fail(node, "a lookup of constant ids with a batch dimension of its own")
            ref = next(v for n, v in program.env.items() if n.op == "placeholder")
            return program.emit(node.name, "constant", [ref], out.expand(ref.dummy.shape[0], *out.shape[1:]),
                                q.scale.double(), bound, tensors={"codes": out})
        if not isinstance(ids, Value) or not (is_index(ids) or program.input_name == ids.name):
            program.fail(node, "an embedding lookup of ids that are not integers")
        dummy = lookup(ids.dummy, codes, b, c, q.qmin, q.qmax)
        widths = m.weight_quantizer.row_bits  # the widest row decides whether the fast export can pack the table
        attrs = {"w_bits": m.w_bits if widths is None else int(widths.max()), "qmin": q.qmin, "qmax": q.qmax}
        tensors = {"weight": codes.to(torch.int8), "b": b, "c": c}
        if widths is not None:  # a saved file packs each width's rows at that width
            tensors["row_bits"] = widths.to(torch.int8).cpu()
        return program.emit(node.name, "embedding", [ids], dummy, q.scale.double(), bound, attrs, tensors)

    def execute(self, op, inputs, kernel):
        t, a = op.tensors, op.attrs
        return lookup(inputs[0], t["weight"].to(torch.int64), t["b"], t["c"], a["qmin"], a["qmax"])

    def onnx(self, ex, op, ins):
        t, a = op.tensors, op.attrs
        ids = ex.node("Cast", [ins[0].name], "ids", to=ex.TP.INT64)
        # the table stays int8 (one byte per weight); only the looked-up rows become float64 integers
        codes = ex.node("Gather", [ex.const("table", t["weight"].numpy().astype(np.int8)), ids], "row_codes", axis=0)
        rows = ex.node("Cast", [codes], "rows", to=ex.TP.DOUBLE)
        factor = torch.ldexp(t["b"].double(), -t["c"]).numpy()  # b/2^c, exact in float64
        scaled = ex.node("Mul", [rows, ex.node("Gather", [ex.const("dyadic", factor), ids], "row_dyadic", axis=0)], "scaled")
        rounded = ex.node("Floor", [ex.node("Add", [scaled, ex.const("half", np.float64(0.5))], "half")], "rounded")
        return ex.to_codes(rounded, a["qmin"], a["qmax"], float(op.scale))

    def latency_models(self, op, input_shape):
        # a lookup of int64 ids, as the fast export runs it: uint8 output codes, against the float32 table
        table = op.tensors["weight"].numpy()
        return (
            ("Gather", ["w", "x"], {"axis": 0}, {"w": table.astype(np.uint8)}, "uint8", "int64"),
            ("Gather", ["w", "x"], {"axis": 0}, {"w": table.astype(np.float32)}, "float32", "int64"),
        )

    def narrow_latency_models(self, op, input_shape):
        # a table of at most 4-bit codes is looked up packed (GatherBlockQuantized), as the fast export does
        v, d = op.tensors["weight"].shape
        block = _gather_block(d)
        if not block:
            return {}
        attrs = {"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 1, "domain": "com.microsoft"}
        inits = {"w": np.full((v, d // 2), 0x88, np.uint8), "s": np.full((v, d // block), 0.01, np.float32)}
        spec = ("GatherBlockQuantized", ["w", "x", "s"], attrs, inits, "float32", "int64")
        return {bits: spec for bits in (2, 3, 4)}

    def onnx_fast(self, ex, op, ins):
        t, a = op.tensors, op.attrs
        ids = ex.node("Cast", [ins[0].name], "ids", to=ex.TP.INT64)
        block = _gather_block(t["weight"].shape[1])
        if a["w_bits"] <= 4 and block and ex.narrow_kernel(op):
            # a table of at most 4-bit codes stays packed (half a byte per weight): com.microsoft GatherBlockQuantized
            # dequantizes each looked-up row with its scale (the same for every block of a row), then the rows go
            # onto the output grid: the integer lookup's codes but where s_r·q/S lies within float32 rounding of a
            # half step (the integer model multiplies by the dyadic b_r/2^c_r)
            codes = t["weight"].to(torch.int16) + 8  # GatherBlockQuantized's default zero point for packed uint8
            v, d = codes.shape
            pairs = codes.reshape(v, d // 2, 2)
            packed = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8).numpy()
            row_scale = torch.ldexp(t["b"].double(), -t["c"]).reshape(-1) * float(op.scale)  # s_r, as b_r/2^c_r·S
            scales = row_scale.reshape(-1, 1).expand(v, d // block).numpy().astype(np.float32)
            rows = ex.node("GatherBlockQuantized", [ex.const("table4", packed), ids, ex.const("row_scale", scales)],
                           "rows", domain="com.microsoft", bits=4, block_size=block, gather_axis=0, quantize_axis=1)
            return ex.on_grid(rows, op, "rows_q")
        # every id's row of output codes, computed once by the integer lookup itself: one uint8 Gather, bit for bit
        # the integer model's, and a table of one byte per weight
        zp = 128 if a["qmin"] < 0 else 0
        every_id = torch.arange(t["weight"].shape[0])
        table = lookup(every_id, t["weight"].to(torch.int64), t["b"], t["c"], a["qmin"], a["qmax"]) + zp
        rows = ex.node("Gather", [ex.const("table", table.numpy().astype(np.uint8)), ids], "rows", axis=0)
        return ex.tensor(rows, "codes", float(op.scale), zp)
