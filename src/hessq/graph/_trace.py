"""Tracing a model with torch.fx, with errors that say where and what to do."""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from hessq._errors import ConfigError, ConfigTypeError, ModelError
from hessq.ops import weighted_module_types
from hessq.graph._hf import capture
from hessq.ops.mask import padding_positions, relative_position_buckets
from hessq.ops.softmax import masked_softmax


class UntraceableModelError(ModelError, RuntimeError):
    """torch.fx could not trace the model."""


class UnsupportedOpError(ModelError, RuntimeError):
    """The graph holds an op that hessq does not know how to quantize."""


class _LocatingTracer(fx.Tracer):
    """An fx tracer that records stack traces and remembers which module it was inside."""

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        # hessq's own graph-level functions (masked softmax) stay one node, whatever they compute inside
        super().__init__(autowrap_functions=(masked_softmax, padding_positions, relative_position_buckets))
        self.record_stack_traces = True
        self.leaf_names = set(leaf_modules)
        self.path: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a quantizable layer is one node, whatever its forward does inside (a registered op family's module)
        return qualname in self.leaf_names or isinstance(m, weighted_module_types()) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.path.append((self.path_of_module(m), type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.path.pop()
        return result


def _user_frame(tb_frames: list[traceback.FrameSummary]) -> str | None:
    """The innermost frame outside torch itself: the line of the user's model that failed."""
    for frame in reversed(tb_frames):
        if "/torch/" not in frame.filename.replace("\\", "/"):
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return None


def trace(model: nn.Module, leaf_modules: Iterable[str] = ()) -> fx.GraphModule:
    """Symbolically trace a copy of ``model``; the original is never modified.

    ``leaf_modules`` are module paths kept as single opaque calls instead of traced into.
    Raises :class:`UntraceableModelError` naming the module and source line that failed.
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    leaf_modules = list(leaf_modules)
    known = {name for name, _ in model.named_modules()}
    unknown = [name for name in leaf_modules if name not in known]
    if unknown:
        raise ConfigError(f"leaf_modules names {unknown} that are not modules of {type(model).__name__}")
    model = copy.deepcopy(capture(model))
    tracer = _LocatingTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        where = _user_frame(traceback.extract_tb(exc.__traceback__))
        inside = f" inside module `{tracer.path[-1][0]}` ({tracer.path[-1][1]})" if tracer.path and tracer.path[-1][0] else ""
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}{inside}"
            + (f" at {where}" if where else "")
            + f": {type(exc).__name__}: {exc}\n"
            "What to do: make the forward free of Python control flow that depends on tensor values "
            "(see the torch.fx documentation on symbolic tracing), or keep the offending submodule "
            "unquantized by naming it in leaf_modules=[...] together with unsupported='float'."
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)
