"""The fake-quantized model: float fake-quant with STE in training, the integer program in eval."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch import nn

from hessq.graph import act_quantizers
from hessq.ops import IntegerConversionError, Op, compile_graph, run_program


class QuantizedModel(nn.Module):
    """A model from :func:`hessq.quantize`.

    Its submodules keep the original module paths (``layer1.0.conv1`` is a quantized
    twin). In training mode (and during calibration) it runs fake quantization in
    float with straight-through gradients. In eval mode it runs the integer program that
    :func:`hessq.to_integer` deploys: int codes, int32 bias, dyadic requantization, the same
    ops executed by the same code, so what you evaluate is what you deploy (HAWQ-V3).
    ``integer_eval=False`` switches eval mode back to float fake quantization; a model with a part that has no
    integer form (block-wise weights, an op family without one) does so by itself at its first eval call, with
    a warning naming the part.

    The program is compiled on the first eval call and kept while nothing it depends on
    changes: it is compiled again when any parameter or buffer (weights, quantizer scales)
    was written since (an optimizer step, ``load_state_dict``, recalibration: every in-place
    write bumps a tensor's version counter; a write through ``.data`` changes its sum) or when
    the per-sample input shape differs.
    """

    def __init__(self, gm: fx.GraphModule, layer_bits: Mapping[str, tuple[int, int] | None], float_ops: list[str]) -> None:
        super().__init__()
        for name, child in gm.named_children():
            self.add_module(name, child)
        # Not a registered submodule: its children are ours, registered above.
        self._graph_module = (gm,)
        self.layer_bits = dict(layer_bits)
        self.float_ops = list(float_ops)
        # Float ops or float layers leave no integer form: eval falls back to float fake-quant.
        self.integer_eval = not float_ops and all(bits is not None for bits in self.layer_bits.values())
        self._program_cache: tuple = ()
        self.eval()

    @property
    def graph_module(self) -> fx.GraphModule:
        """The fx GraphModule (float fake-quant forward) sharing this model's submodules."""
        return self._graph_module[0]

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def _calibrating(self) -> bool:
        return any(q.observing or not bool(q.calibrated) for q in act_quantizers(self).values())

    @torch.no_grad()
    def _state_key(self, input_shape: tuple[int, ...]) -> tuple:
        tensors = [t for t in list(self.parameters()) + list(self.buffers()) if t.numel()]
        # version counters catch optimizer steps, load_state_dict and recalibration; the sums catch writes
        # that bypass them (through ``.data``)
        sums = torch.stack([t.detach().double().sum() for t in tensors]).tolist() if tensors else []
        return (tuple(input_shape), tuple((t.data_ptr(), t._version) for t in tensors), tuple(sums))

    def program(self, input_shape: tuple[int, ...] | None = None) -> tuple[list[Op], str, str, tuple[int, ...]]:
        """(ops, input name, output name, per-sample input shape) of the integer program, compiled for
        ``input_shape`` (default: the calibration inputs' shape); cached until the model changes."""
        if self._calibrating() or not hasattr(self, "input_shape"):
            uncalibrated = [n for n, q in act_quantizers(self).items() if not bool(q.calibrated)]
            raise IntegerConversionError(
                f"the model was never calibrated (uncalibrated quantizers: {uncalibrated[:3]}); "
                "quantize it with hessq.quantize(model, plan, calibration_batches) first"
            )
        if self.float_ops:
            raise IntegerConversionError(f"the model keeps float ops with no integer form: {self.float_ops[:3]}")
        floats = [n for n, b in self.layer_bits.items() if b is None]
        if floats:
            raise IntegerConversionError(
                f"layers {floats[:3]} were left in floating point by the plan; an integer model needs every layer quantized")
        shape = tuple(input_shape) if input_shape is not None else tuple(self.input_shape)
        key = self._state_key(shape)
        if not self._program_cache or self._program_cache[0] != key:
            ops, input_name, output_name = compile_graph(self.graph_module, shape)
            self._program_cache = (key, (ops, input_name, output_name, shape))
        return self._program_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.integer_eval or self._calibrating():
            return self.graph_module(x)
        try:
            ops, input_name, output_name, _ = self.program(tuple(x.shape[1:]))
        except IntegerConversionError as exc:
            # a part with no integer form (block-wise weights, an op family without one): eval mode computes float
            # fake quantization instead, said once; hessq.to_integer still refuses with this message
            self.integer_eval = False
            warnings.warn(f"this quantized model has no integer-only form, so its eval mode runs float fake "
                          f"quantization (set integer_eval = False to silence this): {exc}", stacklevel=2)
            return self.graph_module(x)
        out = run_program(ops, input_name, output_name, x)
        return out.to(x.dtype if x.is_floating_point() else torch.float32)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float fake quantization (the training-mode arithmetic), whatever the mode."""
        return self.graph_module(x)
