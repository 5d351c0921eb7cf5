"""The op registry: one :class:`QuantOp` subclass per op family, looked up rather than branched on.

A family declares which float modules, functions and tensor methods it matches, and everything
each stage needs from it: the one canonical form the normalising pass gives it, its fake-quant
twin and BatchNorm folding (weighted families), its integer compile and execute, its exact and
fast ONNX emission, its cost, and the graph that times it on ONNX Runtime. Stages call these
methods; none of them tests for a module type.

Adding an op is one file: subclass :class:`QuantOp`, set the class attributes, override the
methods that apply, decorate with :func:`register` (and :func:`unregister` it in a test).
"""

from __future__ import annotations

import inspect
import operator
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from hessq._errors import ConfigError, ModelError


class IntegerConversionError(ModelError, RuntimeError):
    """The model has a part with no integer-only form."""


class QuantOp:
    """One op family. Class attributes say what it matches; methods say what each stage does with it."""

    #: A short unique name (``"conv2d"``); also the cost model's ``kind``.
    name: ClassVar[str] = ""
    #: Float module types, functions and ``Tensor`` method names this family matches.
    modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    functions: ClassVar[tuple[Callable, ...]] = ()
    methods: ClassVar[tuple[str, ...]] = ()
    #: The function every form of the op becomes in the normalising pass (None: nodes keep their form).
    canonical: ClassVar[Callable | None] = None
    #: The integer-program op kinds this family executes and exports.
    kinds: ClassVar[tuple[str, ...]] = ()
    #: A quantizable layer: its own weights, its own bits in a plan, a quantized twin.
    weighted: ClassVar[bool] = False
    #: Output codes lie on the input's grid (ReLU, max-pool, reshape): no requantization after it.
    keeps_grid: ClassVar[bool] = False
    #: Reads a transformer's residual stream (LayerNorm): its input quantizer takes the rewrite's ``residual_bits``.
    reads_residual: ClassVar[bool] = False
    #: Can carry the residual stream (add): its output quantizer takes ``residual_bits`` when every consumer of the
    #: output reads or carries the stream (BERT's adds before each LayerNorm, a pre-LN chain of adds), not a layer.
    carries_residual: ClassVar[bool] = False
    #: Output lies within the input's range (average pooling, mean).
    averaging: ClassVar[bool] = False
    #: A fixed range of every output (ReLU6: (0, 6)), or None.
    output_range: ClassVar[tuple[float, float] | None] = None

    # -- matching and normalising ------------------------------------------------------------------
    def matches(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """Whether ``node`` is this op. The default checks the declared modules, functions and methods."""
        if node.op == "call_module":
            return isinstance(modules.get(node.target), self.modules) if self.modules else False
        if node.op == "call_method":
            return node.target in self.methods
        return node.op == "call_function" and any(node.target is f for f in self.functions)

    def canonical_call(self, node: fx.Node, module: nn.Module | None) -> tuple[tuple, dict] | None:
        """``(args, kwargs)`` of :attr:`canonical` equivalent to ``node`` (``module`` for a module call),
        or None to leave the node as it is (a form the canonical function cannot express)."""
        if module is not None:
            return None
        return tuple(node.args), dict(node.kwargs)

    # -- graph stage: fake quantization --------------------------------------------------------------
    def quantized_module(self, module: nn.Module, w_bits: int, a_bits: int, granularity: str, num_groups: int) -> nn.Module:
        """The fake-quant twin of a weighted module."""
        raise NotImplementedError(f"op family {self.name!r} has no quantized twin")

    def fold_batchnorm(self, module: nn.Module, bn: nn.Module) -> nn.Module | None:
        """The module computing ``bn(module(x))`` (BatchNorm in eval mode), or None when it does not fold."""
        return None

    def requantizing_module(self, node: fx.Node, new_quantizer: Callable[[], nn.Module]) -> tuple[nn.Module, tuple] | None:
        """(module, its args) that replaces ``node`` and puts its output on a grid of its own (add, cat), or None
        when the op carries its input's codes through. ``new_quantizer()`` makes an activation quantizer
        (with the rewrite's range settings) for the module to own; the module keeps its output quantizer
        as ``output_quantizer``."""
        return None

    # -- integer stage -----------------------------------------------------------------------------------
    def compile(self, program: Any, node: fx.Node, op: Any, args: tuple, kwargs: dict) -> Any:
        """Emit this node's integer ops into ``program`` (a :class:`hessq.ops.ProgramBuilder`); return the value."""
        program.fail(node, f"the {self.name} op")

    def execute(self, op: Any, inputs: list[torch.Tensor], kernel: str) -> torch.Tensor:
        """Run one program op of a kind this family declared, on int64 codes."""
        raise NotImplementedError(f"op family {self.name!r} has no integer execution")

    def onnx(self, export: Any, op: Any, inputs: list[Any]) -> Any:
        """Exact ONNX emission of one program op (bit for bit the integer model)."""
        raise IntegerConversionError(f"op family {self.name!r} has no ONNX export")

    def onnx_fast(self, export: Any, op: Any, inputs: list[Any]) -> Any:
        """Fast ONNX emission (ONNX Runtime's fused int8 kernels); by default the exact one."""
        return self.onnx(export, op, inputs)

    def fast_reads_real(self, op: Any) -> bool:
        """Whether the fast emission of ``op`` computes in float32 from the real value of its (first) input, so the
        fast export may leave out rounding that input onto its grid (a requantize only it reads). By default no."""
        return False

    def fast_saturates_input(self, op: Any, grid: Any) -> bool:
        """Whether the fast emission of ``op`` (one that :meth:`fast_reads_real`) needs its input clipped to the range
        of ``grid`` (the requantize it reads), or gives the same output without. By default it needs it."""
        return True

    # -- plan stage ----------------------------------------------------------------------------------------
    def macs(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
        """Multiply-accumulates of one call of a weighted module, summed over the batch."""
        raise NotImplementedError(f"op family {self.name!r} has no cost")

    def latency_models(self, op: Any, input_shape: list[int]) -> tuple[tuple, tuple]:
        """How to time this weighted op alone on ONNX Runtime: an integer and a float32 one-node graph, each
        ``(op_type, input names, attributes, {initializer name: array}, output dtype name)``; the graph input
        is ``"x"`` (uint8 codes for the integer graph, float32 for the float one; a sixth entry ``"int64"`` makes it
        token ids)."""
        raise ConfigError(f"op family {self.name!r} has no latency probe; it cannot enter a latency table")

    def narrow_latency_models(self, op: Any, input_shape: list[int]) -> dict[int, tuple]:
        """Weight widths the fast export runs on a kernel of their own (4-bit Linear: MatMulNBits), each with its
        one-node graph as in :meth:`latency_models` but reading float32 ``"x"``; the widths not listed share the
        integer graph's time. By default none."""
        return {}


_FAMILIES: dict[str, QuantOp] = {}
_BY_KIND: dict[str, QuantOp] = {}


def register(cls: type[QuantOp]) -> type[QuantOp]:
    """Class decorator: add an op family to the registry (its name and kinds must be new)."""
    family = cls()
    if not family.name:
        raise ConfigError(f"{cls.__name__} has no name")
    if family.name in _FAMILIES:
        raise ConfigError(f"an op family named {family.name!r} is registered already ({type(_FAMILIES[family.name]).__name__})")
    taken = [k for k in family.kinds if k in _BY_KIND]
    if taken:
        raise ConfigError(f"{cls.__name__}: program op kinds {taken} belong to another family already")
    _FAMILIES[family.name] = family
    for kind in family.kinds:
        _BY_KIND[kind] = family
    return cls


def unregister(name: str) -> None:
    """Remove a family registered with :func:`register` (tests that register a toy op clean up with it)."""
    family = _FAMILIES.pop(name)
    for kind in family.kinds:
        _BY_KIND.pop(kind, None)


def families() -> Iterator[QuantOp]:
    """Every registered family, in registration order."""
    return iter(list(_FAMILIES.values()))


def canonical_function(family: QuantOp) -> Callable | None:
    """The family's canonical function as declared (a plain function set on a class would come back bound)."""
    fn = inspect.getattr_static(family, "canonical")
    return fn.__func__ if isinstance(fn, staticmethod) else fn


def family_of(node: fx.Node, modules: dict[str, nn.Module]) -> QuantOp | None:
    """The family ``node`` belongs to, or None for an op hessq does not know."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    # later registrations win, so a user's family can refine a built-in one
    for family in reversed(list(_FAMILIES.values())):
        if family.matches(node, modules):
            return family
    return None


def family_of_module(module: nn.Module) -> QuantOp | None:
    """The family whose modules include ``module``'s type."""
    for family in reversed(list(_FAMILIES.values())):
        if family.modules and isinstance(module, family.modules):
            return family
    return None


def family_for_kind(kind: str) -> QuantOp:
    """The family that executes and exports program ops of ``kind``."""
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise ConfigError(f"unknown integer op {kind!r} (a file from a newer hessq, or an op family not registered)") from None


def weighted_module_types() -> tuple[type[nn.Module], ...]:
    """The float module types that are quantizable layers (every weighted family's modules)."""
    return tuple(t for f in _FAMILIES.values() if f.weighted for t in f.modules)


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``module ReLU6 `act` ``, ``method Tensor.mean``, ``function torch.sigmoid``: what a node calls."""
    if node.op == "call_module":
        return f"module {type(modules[node.target]).__name__} `{node.target}`"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    target = node.target
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    return f"function {mod + '.' if mod else ''}{name}"


def node_location(node: fx.Node) -> str:
    """``in module `path` (Type) at file:line (code)`` for an fx node, as far as it is known."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1]
        parts.append(f"in module `{path}` ({getattr(kind, '__name__', kind)})")
    if node.stack_trace:
        frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.stack_trace)
        user = [f for f in frames if not _library_frame(f[0])]
        if user:
            file, line, code = user[-1]
            parts.append(f"at {file}:{line} ({code.strip()})")
    return " ".join(parts) if parts else f"at graph node `{node.name}`"


def _library_frame(filename: str) -> bool:
    """A frame of torch itself or of hessq's tracer and ops (a module call is recorded from inside the tracer)."""
    path = filename.replace("\\", "/")
    return "/torch/" in path or "/hessq/graph/" in path or "/hessq/ops/" in path


def is_shape_arithmetic(node: Any) -> bool:
    """Whether ``node`` computes a Python int from sizes (``x.size(0)``, ``x.shape[1]``), not a tensor."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim"):
        return True
    if node.op == "call_function" and node.target in (getattr, operator.getitem):
        return is_shape_arithmetic(node.args[0]) if isinstance(node.args[0], fx.Node) else True
    if node.op == "call_function" and node.target in _SIZE_OPS:
        # arithmetic and comparisons on sizes and numbers (``h // p``, ``c1 * c2``, ``torch._assert(h == 224)``)
        return all(is_shape_arithmetic(a) for a in _flat((node.args, node.kwargs)) if isinstance(a, fx.Node))
    return False


_SIZE_OPS = (operator.mul, operator.floordiv, operator.add, operator.sub, operator.eq, operator.ne, operator.mod,
             operator.lt, operator.le, operator.gt, operator.ge, torch._assert)


def _flat(obj: Any) -> list:
    if isinstance(obj, (list, tuple)):
        return [x for o in obj for x in _flat(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _flat(o)]
    return [obj]
