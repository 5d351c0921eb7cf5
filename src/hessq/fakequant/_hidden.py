"""Hidden-state distillation for QAT: the quantized model's intermediate outputs pulled toward the teacher's.

TinyBERT-style: besides the logits, the student matches the teacher's hidden states, the mean squared
difference of each named module's output. Module paths are the user's (``bert.encoder.layer.3.output.LayerNorm``).
In a quantized model such a module may no longer be the one called: hessq.quantize replaces a LayerNorm by its
quantized twin (``quant_layer_norm_7``), which the graph records as coming from that path; its output is the
quantized hidden state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError, ConfigTypeError

#: What ``hidden_layers=None`` distills: every LayerNorm's output (a BERT's embeddings and both norms of each layer).
DEFAULT_HIDDEN = (nn.LayerNorm,)


def _called_from(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> the module the model's graph calls for it (itself, or the quantized twin standing in for it)."""
    graph = getattr(model, "graph", None)
    if graph is None:  # not a graph: each module is called as itself
        return dict(model.named_modules())
    called: dict[str, nn.Module] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        called[node.target] = module
        stack = node.meta.get("nn_module_stack") or {}
        if stack:  # the source module this call was made for (a replaced LayerNorm's twin records the LayerNorm)
            called.setdefault(list(stack.values())[-1][0], module)
    return called


def hidden_layer_names(teacher: nn.Module, names: Sequence[str] | None) -> list[str]:
    """The checked module paths to distill: ``names``, or every LayerNorm of the teacher."""
    if names is None:
        found = [n for n, m in teacher.named_modules() if isinstance(m, DEFAULT_HIDDEN)]
        if not found:
            raise ConfigError("hidden_weight > 0 distills every LayerNorm's output by default, but the teacher has "
                              "no LayerNorm: name the modules to match with hidden_layers=[...] (module paths)")
        return found
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigTypeError(f"hidden_layers must be a list of module paths (str), got {names!r}")
    if not names:
        raise ConfigError("hidden_layers is empty; name at least one module, or pass None for every LayerNorm")
    return list(dict.fromkeys(names))


class HiddenStates:
    """Forward hooks collecting the outputs of the same named modules in the student and in the teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str]) -> None:
        called = _called_from(student)
        teacher_modules = dict(teacher.named_modules())
        missing = [n for n in names if n not in called or n not in teacher_modules]
        if missing:
            raise ConfigError(
                f"hidden_layers names module(s) {missing[:4]} that the quantized model or the teacher does not run; "
                "use module paths of the original model (e.g. 'bert.encoder.layer.0.output.LayerNorm')")
        self.names = list(names)
        self._pairs = [(called[n], teacher_modules[n]) for n in self.names]
        self.student: list[torch.Tensor] = []
        self.teacher: list[torch.Tensor] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[HiddenStates]:
        """Hooks on both models while the block runs (removed after, even on an error)."""
        handles = []
        for s, t in self._pairs:
            handles.append(s.register_forward_hook(lambda _m, _i, out: self.student.append(out)))
            handles.append(t.register_forward_hook(lambda _m, _i, out: self.teacher.append(out)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.clear()

    def clear(self) -> None:
        self.student.clear()
        self.teacher.clear()

    def loss(self) -> torch.Tensor:
        """The mean over modules of the mean squared difference of their outputs in this step; then cleared."""
        if len(self.student) != len(self.teacher) or not self.student:
            raise ConfigError(
                f"hidden-state distillation saw {len(self.student)} outputs of the quantized model and "
                f"{len(self.teacher)} of the teacher for {len(self.names)} module(s): each must run once per forward")
        out = torch.stack([F.mse_loss(s.float(), t.float().detach()) for s, t in zip(self.student, self.teacher)]).mean()
        self.clear()
        return out
