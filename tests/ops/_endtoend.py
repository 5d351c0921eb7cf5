"""What every op's test checks end to end: quantize, the integer model equal to the quantized model's eval mode
bit for bit, saved and loaded, the exact ONNX export equal to it in ONNX Runtime, the fast export run by ONNX
Runtime."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import hessq
from hessq.quantizer import ActQuantizer

#: Within this fraction of its value (at least 1e-6 code units) of a half step, the float and the dyadic
#: requantization may round an activation to neighbouring codes: the float value carries a few float32 roundings
#: (each 6e-8 of the value at most), the dyadic one an error below 2^-30.
NEAR_TIE = 1e-6


def assert_float_forward_close(qmodel: nn.Module, imodel: hessq.IntegerModel, x: torch.Tensor, y_int: torch.Tensor,
                               steps: float = 4) -> None:
    """The float fake quantization (``qmodel.float_forward``) is within ``steps`` steps of the integer model's
    output grid on every sample whose activations all lie away from a rounding tie of their grids.

    Where one lies within float rounding of a tie, the two arithmetics may pick neighbouring codes, and one code
    moves everything after it by far more than an output step: those samples are not compared, and at least half
    of the samples must be. Each sample runs alone (a sample's float forward does not depend on the rest
    of its batch), so a tie is charged to its own sample.
    """
    step = float(imodel.ops[-1].tensors["scale"].max())
    near = [False]

    def look(module: ActQuantizer, args: tuple) -> None:
        v = args[0].detach().double() / module.scale.double()
        near[0] |= bool(((v - v.floor() - 0.5).abs() < NEAR_TIE * v.abs().clamp(min=1)).any())

    hooks = [m.register_forward_pre_hook(look) for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    compared = 0
    try:
        for i in range(len(x)):
            near[0] = False
            with torch.no_grad():
                y = qmodel.float_forward(x[i : i + 1])
            if not near[0]:
                compared += 1
                assert (y_int[i : i + 1] - y).abs().max() <= steps * step, i
    finally:
        for h in hooks:
            h.remove()
    assert compared >= len(x) / 2, f"only {compared} of {len(x)} samples lie away from rounding ties"


@dataclass
class EndToEnd:
    qmodel: nn.Module
    imodel: hessq.IntegerModel
    x: torch.Tensor
    y_int: torch.Tensor
    y_fast: np.ndarray  # the fast ONNX export's output, for the agreement a test states

    def values(self) -> dict[str, torch.Tensor]:
        """Every named value of the integer program on ``x``."""
        return self.imodel.run(self.x, keep=True)

    def op(self, kind: str):
        return next(op for op in self.imodel.ops if op.kind == kind)


def calibration(shape: tuple[int, ...], n: int = 3, batch: int = 16, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g),) for _ in range(n)]


def warm_batchnorm(model: nn.Module, shape: tuple[int, ...], passes: int = 5) -> nn.Module:
    """Running statistics that are not the identity: a few train-mode passes on random inputs."""
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(8, *shape, generator=g))
    return model.eval()


def _onnx(imodel, path, mode, x) -> np.ndarray:
    hessq.export_onnx(imodel, path, mode=mode)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def end_to_end(model: nn.Module, shape: tuple[int, ...], tmp_path, *, kinds: set[str] = frozenset(), plan=8,
               x: torch.Tensor | None = None, **quantize_options) -> EndToEnd:
    q = hessq.quantize(model, plan, calibration(shape), pin_first_last=None, **quantize_options)
    x = calibration(shape, 1, 8, seed=7)[0][0] if x is None else x
    imodel = hessq.to_integer(q)
    assert kinds <= {op.kind for op in imodel.ops}
    y_int = imodel(x)
    # the quantized model's eval mode runs this very program
    assert torch.equal(q(x), y_int)
    # the exact export reproduces it bit for bit in ONNX Runtime
    assert np.array_equal(_onnx(imodel, tmp_path / "exact.onnx", "exact", x), y_int.numpy())
    # the program saves and loads (its tables, factors and layout attributes included)
    imodel.save(tmp_path / "model.hq")
    assert torch.equal(hessq.load_integer(tmp_path / "model.hq")(x), y_int)
    y_fast = _onnx(imodel, tmp_path / "fast.onnx", "fast", x)
    assert y_fast.shape == tuple(y_int.shape) and np.isfinite(y_fast).all()
    return EndToEnd(q, imodel, x, y_int, y_fast)
