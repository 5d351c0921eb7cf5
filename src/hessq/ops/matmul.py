"""Activation × activation matrix products (attention's q·kᵀ and p·v): both inputs on activation grids of their own.

Fake quantization: q_a(a) @ q_b(b). The product is an accumulator, as a Linear layer's is: the op that reads it puts
it on its grid (the softmax's input quantizer after q·kᵀ·d^-½, the output projection's after p·v), so it is rounded
once. In the integer program it is an exact matmul of codes, Σ_k a_ik·b_kj at scale s_a·s_b (``matmul`` ops, run and
exported by :mod:`hessq.ops.attention`: MatMulInteger in ONNX). An input that comes from a softmax is quantized on the
softmax's own fixed grid [0, 1], so its codes pass unchanged.

:func:`matmul_macs` gives the cost model the multiply-accumulates of such a product from its input shapes.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch import nn

from hessq.ops._program import Value
from hessq.ops._registry import QuantOp, family_of, register
from hessq.ops.mul import _tensor_node
from hessq.ops.quant import to_grid
from hessq.ops.softmax import QuantSoftmax
from hessq.quantizer import ActQuantizer

#: Widest codes an integer matmul takes (ONNX Runtime's MatMulInteger reads 8-bit codes).
MAX_INTEGER_BITS = 8


def matmul_macs(a_shape: tuple[int, ...] | torch.Size, b_shape: tuple[int, ...] | torch.Size) -> int:
    """Multiply-accumulates of ``torch.matmul`` of tensors of these shapes (batch dimensions broadcast)."""
    a, b = list(a_shape), list(b_shape)
    if len(a) == 1:
        a = [1] + a
    if len(b) == 1:
        b = b + [1]
    if a[-1] != b[-2]:
        raise ValueError(f"matmul of shapes {tuple(a_shape)} and {tuple(b_shape)}: inner sizes {a[-1]} and {b[-2]} differ")
    batch = torch.broadcast_shapes(torch.Size(a[:-2]), torch.Size(b[:-2]))
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


class QuantMatmul(nn.Module):
    """Fake-quant product of two activations: q_a(a) @ q_b(b) (the consumer quantizes the result)."""

    def __init__(self, quantizer_a: ActQuantizer, quantizer_b: ActQuantizer) -> None:
        super().__init__()
        self.quantizer_a, self.quantizer_b = quantizer_a, quantizer_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.quantizer_a(a), self.quantizer_b(b))


def _from_softmax(node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a quantized softmax's output, past ops that keep the grid (dropout, reshape)."""
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(modules.get(node.target), QuantSoftmax):
            return True
        family = family_of(node, modules)
        if family is None or not family.keeps_grid or not node.args:
            return False
        node = node.args[0]
    return False


@register
class Matmul(QuantOp):
    name = "matmul_act"
    modules = (QuantMatmul,)
    functions = (torch.matmul, operator.matmul, torch.bmm)
    methods = ("matmul", "bmm")
    canonical = torch.matmul
    kinds = ()  # emits "matmul", which the attention family executes and exports

    def matches(self, node, modules):
        if not super().matches(node, modules):
            return False
        return node.op == "call_module" or (len(node.args) == 2 and all(_tensor_node(a) for a in node.args))

    def canonical_call(self, node, module):
        if module is not None or node.kwargs or len(node.args) != 2:
            return None
        return tuple(node.args), {}

    def requantizing_module(self, node, new_quantizer):
        if node.op == "call_module" or node.kwargs or len(node.args) != 2 or not all(_tensor_node(a) for a in node.args):
            return None
        modules = dict(node.graph.owning_module.named_modules())
        a, b = (new_quantizer((0.0, 1.0)) if _from_softmax(x, modules) else new_quantizer() for x in node.args)
        return QuantMatmul(a, b), tuple(node.args)

    def compile(self, program, node, m, args, kwargs):
        if not isinstance(m, QuantMatmul):
            program.fail(node, "a matmul with a constant or a parameter")
        if max(m.quantizer_a.bits, m.quantizer_b.bits) > MAX_INTEGER_BITS:
            program.fail(node, f"a matmul of {m.quantizer_a.bits}-bit and {m.quantizer_b.bits}-bit codes (8-bit only)")
        a: Value = to_grid(program, f"{node.name}_a", args[0], m.quantizer_a)
        b: Value = to_grid(program, f"{node.name}_b", args[1], m.quantizer_b)
        if a.dummy.dim() < 3 or b.dummy.dim() != a.dummy.dim():
            program.fail(node, "a matmul of tensors of different ranks or without batch dimensions")
        inner = a.dummy.shape[-1]
        return program.emit(node.name, "matmul", [a, b], a.dummy @ b.dummy, a.scale * b.scale, a.qmax * b.qmax * inner)
