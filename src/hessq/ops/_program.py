"""The integer program: compiled once from a calibrated quantized model, run by one executor.

The program is a list of :class:`Op`, each reading named values and writing one. Every
integer value carries its scale (``Op.scale``, float64, broadcastable): the real number it
stands for is codes · scale, so the arithmetic can be audited op by op. The quantized model's
eval mode, the :class:`hessq.IntegerModel` and the exact ONNX export all run this one program,
so they agree bit for bit by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.fx as fx

from hessq.ops._registry import IntegerConversionError, describe, family_for_kind, family_of, node_location


@dataclass
class Op:
    """One step of the integer program."""

    kind: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: torch.Tensor | None = None  # of the output; None for float values


@dataclass
class Value:
    """A value while compiling: its program name, a batch-1 stand-in for its shape, its scale."""

    name: str
    dummy: torch.Tensor
    scale: torch.Tensor | None  # None: a float value
    qmax: int = 0  # largest |code| (a static bound), for integer values
    # Zero padding applied to a float value (the model input, e.g. TF "same" padding before the stem):
    # (pads, shape before) in order. Deferred until the value is quantized: with zero-point 0, quantizing
    # then padding with code 0 is exactly padding then quantizing, and keeps the pad integer.
    pending_pads: tuple = ()


def channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel [C] tensor shaped to broadcast on dim 1 of an ``ndim`` tensor (a scalar as it is)."""
    return t if t.dim() == 0 else t.reshape([1, -1] + [1] * (ndim - 2))


def _has_value(obj: Any) -> bool:
    found = []
    fx.node.map_aggregate(obj, lambda a: found.append(a) if isinstance(a, Value) else None)
    return bool(found)


class ProgramBuilder:
    """Walks a quantized model's fx graph and asks each node's op family to emit its integer ops."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ops: list[Op] = []
        self.env: dict[fx.Node, Any] = {}
        self.input_name = self.output_name = ""

    def emit(self, name: str, kind: str, inputs: list[Value], dummy: torch.Tensor, scale: torch.Tensor | None,
             qmax: int, attrs: dict | None = None, tensors: dict | None = None) -> Value:
        """Append one op writing ``name``; returns the value it makes."""
        self.ops.append(Op(kind, [v.name for v in inputs], name, attrs or {}, tensors or {}, scale))
        return Value(name, dummy, scale, qmax)

    def attribute(self, target: str) -> torch.Tensor:
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj.detach().double() if isinstance(obj, torch.Tensor) else obj

    def fail(self, node: fx.Node, what: str) -> NoReturn:
        raise IntegerConversionError(
            f"{what} has no integer-only form ({node_location(node)}). Evaluate the quantized model in "
            "float fake quantization for such models (model.integer_eval = False), keep that part in float "
            "(unsupported='float'), or register an op family for it (hessq.ops.register)."
        )

    def run(self, input_shape: tuple[int, ...]) -> list[Op]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            self.fail(placeholders[-1] if placeholders else next(iter(self.gm.graph.nodes)), "a model with several inputs")
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node, input_shape)
        return self.ops

    def visit(self, node: fx.Node, input_shape: tuple[int, ...]) -> Any:
        if node.op == "placeholder":
            self.input_name = node.name
            return Value(node.name, torch.zeros(1, *input_shape), None)
        if node.op == "output":
            v = fx.node.map_arg(node.args[0], lambda n: self.env[n])
            if not isinstance(v, Value):
                self.fail(node, "an output that is not one tensor")
            if v.scale is None:
                self.fail(node, "an output computed without any quantized layer")
            self.emit(node.name, "dequantize", [v], v.dummy, None, 0, tensors={"scale": v.scale})
            self.output_name = node.name
            return None
        if node.op == "get_attr":
            # a constant (a parameter or buffer read directly): a float tensor that families may fold in
            # (a layer scale multiplying a tensor); a family that needs a Value refuses it
            return self.attribute(node.target)
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        op = self.modules[node.target] if node.op == "call_module" else node.target
        if not _has_value(args) and not _has_value(kwargs):  # shape arithmetic on Python values
            return getattr(args[0], op)(*args[1:], **kwargs) if node.op == "call_method" else op(*args, **kwargs)
        family = family_of(node, self.modules)
        if family is None:
            self.fail(node, f"the {describe(node, self.modules)}")
        return family.compile(self, node, op, args, kwargs)


def compile_graph(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> tuple[list[Op], str, str]:
    """(ops, input name, output name) of a calibrated quantized GraphModule, for per-sample ``input_shape``."""
    builder = ProgramBuilder(gm)
    with torch.no_grad():
        ops = builder.run(tuple(input_shape))
    return ops, builder.input_name, builder.output_name


@torch.no_grad()
def run_program(ops: list[Op], input_name: str, output_name: str, x: torch.Tensor, *, kernel: str = "auto",
                keep: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """Execute ``ops`` on the float input ``x``: the output (float32), or every named value with ``keep``."""
    env: dict[str, torch.Tensor] = {input_name: x}
    # without keep, each value is dropped after its last reader: a BERT at T=256 and batch 64 holds a few of its
    # 400 MB int64 attention tensors at a time, not all of them
    last_use = {} if keep else {name: i for i, op in enumerate(ops) for name in op.inputs}
    for i, op in enumerate(ops):
        env[op.output] = family_for_kind(op.kind).execute(op, [env[name] for name in op.inputs], kernel)
        for name in op.inputs:
            if last_use.get(name) == i and name != output_name and name in env:
                del env[name]
    return env if keep else env[output_name]

