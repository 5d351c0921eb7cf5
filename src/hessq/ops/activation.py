"""Elementwise activations of one quantized tensor (SiLU, Hardswish, Hardsigmoid, Sigmoid, Tanh, GELU, and any
function registered with :func:`register_elementwise`) by integer lookup table.

On a b-bit input grid there are only 2^b input codes, so the function is a table: for each input code q the output
code clamp(round(f(q·s_in) / s_out)), computed once at compile time in float64. Running the table is exact integer
arithmetic (an index), so no float is needed at inference and the integer model, the quantized model's eval mode
and the ONNX export (a ``Gather`` on the uint8 codes) agree bit for bit. The fake-quant module computes
q_out(f(q_in(x))): it owns the input quantizer (the activation usually follows a conv's accumulator) and the
output quantizer.

The fast ONNX export runs the function in float where ONNX Runtime has a kernel for it (a family's ``onnx_float``:
GELU is com.microsoft's Gelu, tanh is Tanh, ...) on the dequantized input codes, then quantizes onto the output grid:
an elementwise Gather on uint8 codes is several times slower in ONNX Runtime than a vectorised float kernel. The
output code differs from the table's only where f(q·s_in)/s_out lies within float32 rounding of a half step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.ops._registry import QuantOp, families, register
from hessq.ops.quant import to_grid
from hessq.quantizer import ActQuantizer

#: Largest input grid a table is built for (16-bit activations: 65,536 entries).
MAX_TABLE_BITS = 16


class QuantElementwise(nn.Module):
    """Fake-quant elementwise function: q_out(f(q_in(x))), ``f`` the family's float function."""

    def __init__(self, family: str, fn: Callable, params: dict[str, Any], input_quantizer: ActQuantizer,
                 output_quantizer: ActQuantizer) -> None:
        super().__init__()
        self.family, self.fn, self.params = family, fn, dict(params)
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self.fn(self.input_quantizer(x), **self.params))

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """int64 output codes for the input codes qmin_in, ..., qmax_in (in that order)."""
        qi, qo = self.input_quantizer, self.output_quantizer
        codes = torch.arange(qi.qmin, qi.qmax + 1, dtype=torch.int64)
        y = self.fn(codes.double() * qi.scale.double(), **self.params)
        return torch.clamp(torch.round(y / qo.scale.double()), qo.qmin, qo.qmax).to(torch.int64)

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"{self.family}{params}"


class ElementwiseOp(QuantOp):
    """A family for one elementwise function; subclasses set the matches, :attr:`fn` and :attr:`param_names`."""

    #: The float function every form becomes (also the canonical call), evaluated on float64 for the table.
    fn: ClassVar[Callable]
    #: Keyword parameters of :attr:`fn` that change the function (GELU's ``approximate``), with defaults.
    param_names: ClassVar[dict[str, Any]] = {}
    #: The function as ONNX Runtime float ops for the fast export: ``onnx_float(ex, x, params)`` → the output's name
    #: from the float32 input's; None: the fast export reads the table (a Gather), as the exact one does.
    onnx_float: ClassVar[Callable | None] = None
    kinds = ()  # emits "lut", which LookupTable executes and exports

    def matches(self, node, modules):
        if node.op == "call_module":
            m = modules.get(node.target)
            if isinstance(m, QuantElementwise):
                return m.family == self.name
        elif node.op == "call_function" and node.target is type(self).fn:
            return True
        return super().matches(node, modules)

    def canonical_call(self, node, module):
        if module is not None:
            params = {k: getattr(module, k, d) for k, d in self.param_names.items()}
        else:
            params = {k: node.kwargs.get(k, d) for k, d in self.param_names.items()}
            # positional parameters after the input (F.gelu(x, "tanh")); an in-place flag is dropped
            for k, v in zip(self.param_names, node.args[1:]):
                params[k] = v
        return (node.args[0],), params

    def requantizing_module(self, node, new_quantizer):
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or len(node.args) != 1:
            return None
        params = {k: node.kwargs.get(k, d) for k, d in self.param_names.items()}
        return QuantElementwise(self.name, type(self).fn, params, new_quantizer(), new_quantizer()), (x,)

    def compile(self, program, node, m, args, kwargs):
        if not isinstance(m, QuantElementwise):
            program.fail(node, f"{self.name} of a float input")
        qi, qo = m.input_quantizer, m.output_quantizer
        if qi.bits > MAX_TABLE_BITS:
            program.fail(node, f"a {qi.bits}-bit lookup table for {self.name}")
        v = to_grid(program, f"{node.name}_in", args[0], qi)
        # the function's name and parameters let the fast export run it in float (the table alone is exact)
        attrs = {"in_qmin": qi.qmin, "qmin": qo.qmin, "qmax": qo.qmax, "function": self.name, "params": dict(m.params)}
        return program.emit(node.name, "lut", [v], v.dummy, qo.scale.double(), max(-qo.qmin, qo.qmax), attrs,
                            {"table": m.table()})


@register
class LookupTable(QuantOp):
    """Executes and exports the ``lut`` ops the elementwise families emit: out = table[in − in_qmin]."""

    name = "lut"
    kinds = ("lut",)

    def matches(self, node, modules):
        return False

    def execute(self, op, inputs, kernel):
        return op.tensors["table"][inputs[0] - op.attrs["in_qmin"]]

    def onnx(self, ex, op, ins):
        t, a = ins[0], op.attrs
        table = op.tensors["table"]
        out_zp = 128 if a["qmin"] < 0 else 0
        eight_bit = a["qmin"] + out_zp >= 0 and a["qmax"] + out_zp <= 255
        if t.kind == "codes":
            # one entry for each of the 256 uint8 codes: code u stands for u − zp; codes off the input grid clamp
            centred = np.arange(256) - t.zero_point - a["in_qmin"]
            table = table[torch.from_numpy(np.clip(centred, 0, len(table) - 1))]
            index = ex.node("Cast", [t.name], "lut_index", to=ex.TP.INT64)
        elif t.kind == "acc":
            shifted = ex.node("Sub", [t.name, ex.const("in_qmin", np.float64(a["in_qmin"]))], "lut_shift")
            index = ex.node("Cast", [shifted], "lut_index", to=ex.TP.INT64)
        else:
            raise ConfigError("internal: a lookup table read by a float value")
        if eight_bit:
            values = ex.const("table", (table + out_zp).numpy().astype(np.uint8))
            return ex.tensor(ex.node("Gather", [values, index], "lut", axis=0), "codes", float(op.scale), out_zp)
        values = ex.const("table", table.numpy().astype(np.float64))
        return ex.tensor(ex.node("Gather", [values, index], "lut", axis=0), "acc")

    @staticmethod
    def _family(op) -> ElementwiseOp | None:
        return next((f for f in families() if f.name == op.attrs.get("function")), None)

    def _onnx_float(self, op) -> Callable | None:
        return getattr(self._family(op), "onnx_float", None)

    def fast_reads_real(self, op):
        return self._onnx_float(op) is not None

    def fast_saturates_input(self, op, grid):
        # Left out where the function holds the table's end codes beyond the input grid's range: GELU's output
        # saturating above the range and rounding to the same code far below it. Checked on the function at export,
        # on a sweep out to 1000 times the range beyond each end.
        fn, table = type(self._family(op)).fn, op.tensors["table"]
        s_in, lo, hi = float(grid.scale), grid.attrs["qmin"], grid.attrs["qmax"]
        if (lo, hi) != (op.attrs["in_qmin"], op.attrs["in_qmin"] + len(table) - 1):
            return True
        reach = (hi - lo) * s_in * torch.logspace(-4, 3, 400, dtype=torch.float64)
        y = fn(torch.cat([hi * s_in + reach, lo * s_in - reach]), **op.attrs.get("params", {}))
        codes = torch.clamp(torch.round(y / float(op.scale)), op.attrs["qmin"], op.attrs["qmax"])
        return not (bool((codes[:400] == table[-1]).all()) and bool((codes[400:] == table[0]).all()))

    def onnx_fast(self, ex, op, ins):
        onnx_float = self._onnx_float(op)
        if onnx_float is None or ins[0].kind == "acc":
            return self.onnx(ex, op, ins)  # the table (a program from before the function was recorded)
        y = onnx_float(ex, ex.real(ins[0]), op.attrs.get("params", {}))
        return ex.on_grid(y, op, "activation_q")


def register_elementwise(name: str, fn: Callable, *, modules: tuple[type[nn.Module], ...] = (),
                         functions: tuple[Callable, ...] = (), methods: tuple[str, ...] = (),
                         params: dict[str, Any] | None = None, onnx_float: Callable | None = None) -> type[ElementwiseOp]:
    """Register an integer lookup-table family for ``fn``, an elementwise function of one tensor.

    ``fn(x, **params)`` must accept a float64 tensor; every matched module, function (``fn`` itself always) and
    ``Tensor`` method becomes a call of ``fn``. ``onnx_float(ex, x, params)``, if given, emits ``fn`` as ONNX Runtime
    float ops for the fast export (see :attr:`ElementwiseOp.onnx_float`). Returns the family class
    (``unregister(name)`` removes it).
    """
    attrs = {"name": name, "fn": fn, "canonical": staticmethod(fn), "modules": tuple(modules),
             "functions": tuple(functions), "methods": tuple(methods), "param_names": dict(params or {}),
             "onnx_float": staticmethod(onnx_float) if onnx_float is not None else None}
    return register(type(f"Elementwise_{name}", (ElementwiseOp,), attrs))


def _one_op(op_type: str, domain: str = "", **attrs) -> Callable:
    """An ``onnx_float`` of one ONNX node on the input."""
    return lambda ex, x, params: ex.node(op_type, [x], op_type.lower(), domain=domain, **attrs)


def _gelu(ex, x: str, params: dict[str, Any]) -> str:
    # com.microsoft's Gelu is the erf form; FastGelu the tanh approximation
    return ex.node("FastGelu" if params.get("approximate") == "tanh" else "Gelu", [x], "gelu", domain="com.microsoft")


def _silu(ex, x: str, params: dict[str, Any]) -> str:
    return ex.node("Mul", [x, ex.node("Sigmoid", [x], "sigmoid")], "silu")


register_elementwise("silu", F.silu, modules=(nn.SiLU,), onnx_float=_silu)
register_elementwise("hardswish", F.hardswish, modules=(nn.Hardswish,), onnx_float=_one_op("HardSwish"))
register_elementwise("hardsigmoid", F.hardsigmoid, modules=(nn.Hardsigmoid,),
                     onnx_float=_one_op("HardSigmoid", alpha=1 / 6, beta=0.5))
register_elementwise("sigmoid", torch.sigmoid, modules=(nn.Sigmoid,), functions=(F.sigmoid,), methods=("sigmoid",),
                     onnx_float=_one_op("Sigmoid"))
register_elementwise("tanh", torch.tanh, modules=(nn.Tanh,), functions=(F.tanh,), methods=("tanh",),
                     onnx_float=_one_op("Tanh"))
register_elementwise("gelu", F.gelu, modules=(nn.GELU,), params={"approximate": "none"}, onnx_float=_gelu)
