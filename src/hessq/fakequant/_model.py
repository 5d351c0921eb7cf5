"""The fake-quantized model: float fake-quant with STE in training, exact integer arithmetic in eval."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx
from torch import nn

from hessq.graph import act_quantizers


class QuantizedModel(nn.Module):
    """A model from :func:`hessq.quantize`.

    Its submodules keep the original module paths (``layer1.0.conv1`` is a quantized
    twin). In training mode (and during calibration) it runs fake quantization in
    float with straight-through gradients. In eval mode it runs the integer arithmetic
    of the integer model: int codes, int32 bias, dyadic requantization, so what you
    evaluate is exactly what :func:`hessq.to_integer` deploys (HAWQ-V3).
    ``integer_eval=False`` switches eval mode back to float fake quantization.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.integer_eval or self._calibrating():
            return self.graph_module(x)
        from hessq.fakequant._simulate import simulate_integer

        return simulate_integer(self, x)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float fake quantization (the training-mode arithmetic), whatever the mode."""
        return self.graph_module(x)
