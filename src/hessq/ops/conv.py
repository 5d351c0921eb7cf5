"""Conv2d (any stride, padding, dilation, groups): quantized twin, BatchNorm folding, integer accumulator, ONNX."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError
from hessq.ops._program import channel
from hessq.ops._registry import register
from hessq.ops._weighted import WEIGHT_ZERO_POINT, QuantLayer, WeightedOp, uint8_weights
from hessq.quantizer import integer_conv2d


class QuantConv2d(QuantLayer):
    """Conv2d with quantized weight and int32-grid bias."""

    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int, granularity: str = "channel", num_groups: int = 1) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ConfigError(f"only zero padding is supported, got padding_mode={conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ConfigError(f"padding={conv.padding!r} is not supported; give the padding in pixels")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self._init_quant(w_bits, a_bits, granularity, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exact = self.integer_operands(x)
        if exact is None:
            w, b = self.quantized_weight_and_bias()
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        x_codes, w_codes, b_codes, scale = exact  # summed as integers (WeightCodes.integer_operands says why)
        acc = F.conv2d(x_codes, w_codes, b_codes, self.stride, self.padding, self.dilation, self.groups)
        return acc * channel(scale, acc.dim())

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, w_bits={self.w_bits}, a_bits={self.a_bits}"
        )


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing conv then bn (eval mode, running statistics): W' = W·γ/σ, b' = (b − μ)·γ/σ + β."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise ConfigError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    folded = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
        bias=True, padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    folded.weight.copy_(conv.weight * factor.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded.bias.copy_((bias - bn.running_mean) * factor + beta)
    return folded


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


@register
class Conv2d(WeightedOp):
    name = "conv2d"
    modules = (nn.Conv2d,)
    kinds = ("conv2d",)
    twin = QuantConv2d

    def fold_batchnorm(self, module, bn):
        return fold_conv_bn(module, bn) if isinstance(bn, nn.BatchNorm2d) else None

    def layer_attrs(self, m):
        return {"stride": _pair(m.stride), "padding": _pair(m.padding), "dilation": _pair(m.dilation), "groups": m.groups}

    def accumulate(self, x, w, attrs, kernel):
        return integer_conv2d(x, w, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"], kernel)

    @staticmethod
    def _onnx_attrs(a) -> dict:
        return dict(strides=a["stride"], pads=a["padding"] * 2, dilations=a["dilation"], group=a["groups"])

    def onnx(self, ex, op, ins):
        w, w_zp = ex.weight_codes(op.tensors["weight"].numpy(), exact=True)
        attrs = self._onnx_attrs(op.attrs)
        if ins[0].kind == "acc":  # 16-bit codes: ConvInteger reads them a byte plane at a time
            return ex.wide_accumulator(op, ins[0], lambda plane, x_zp: ex.node("ConvInteger", [plane, w, x_zp, w_zp],
                                                                                 "convint", **attrs))
        x = ex.as_codes_input(ins[0], op)
        acc = ex.node("ConvInteger", [x.name, w, ex.const("x_zp", np.uint8(x.zero_point)), w_zp], "convint", **attrs)
        return ex.accumulator(op, acc)

    def onnx_fast(self, ex, op, ins):
        if ins[0].kind == "real":  # a 16-bit input grid stays real in the fast export: a float Conv
            w, bias = ex.real_weights(op)
            inputs = [ins[0].name, ex.const("w", w)] + ([] if bias is None else [ex.const("bias", bias)])
            return ex.tensor(ex.node("Conv", inputs, "conv", **self._onnx_attrs(op.attrs)), "real")
        x = ex.as_codes_input(ins[0], op)
        conv_attrs = self._onnx_attrs(op.attrs)
        if x.padded_from is not None:
            # a separate Pad (TF "same" padding) folds into the conv's own zero-point padding
            top, left, bottom, right = x.pads
            p_h, p_w = op.attrs["padding"]
            conv_attrs["pads"] = [p_h + top, p_w + left, p_h + bottom, p_w + right]
            x = x.padded_from
        plan = ex.fast_output_grid(op)
        if plan is None:
            w, w_zp = ex.weight_codes(op.tensors["weight"].numpy())
            acc = ex.node("ConvInteger", [x.name, w, ex.const("x_zp", np.uint8(x.zero_point)), *filter(None, [w_zp])],
                          "convint", **conv_attrs)
            return ex.accumulator(op, acc)
        chain, last, y, req = plan
        w, ws, wzp = ex.qlinear_weights(op, x)
        inputs = [x.name, *ex.scale_zp(x), w, ws, wzp, *ex.scale_zp(y)]
        if "bias" in op.tensors:
            inputs.append(ex.const("bias", op.tensors["bias"].numpy().astype(np.int32)))
        y.name = ex.node("QLinearConv", inputs, "qconv", **conv_attrs)
        return ex.fuse_chain(op, chain, last, y, req)

    def latency_models(self, op, input_shape):
        w = op.tensors["weight"].numpy().astype(np.int8)
        attrs = self._onnx_attrs(op.attrs)
        return (
            ("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], attrs,
             {"w": w, "xs": np.float32(0.02), "xz": np.uint8(0), "ws": np.full(w.shape[0], 0.01, np.float32),
              "wz": np.zeros(w.shape[0], np.int8), "ys": np.float32(0.05), "yz": np.uint8(0)}, "uint8"),
            ("Conv", ["x", "w"], attrs, {"w": w.astype(np.float32)}, "float32"),
        )

    def narrow_latency_models(self, op, input_shape):
        # 8-bit weights reach ±127: uint8 × uint8, as the fast export runs them (see _weighted.SATURATION_FREE)
        int_spec = self.latency_models(op, input_shape)[0]
        op_type, names, attrs, inits = int_spec[:4]
        channels = inits["w"].shape[0]
        wide = {**inits, "w": uint8_weights(inits["w"]), "wz": np.full(channels, WEIGHT_ZERO_POINT, np.uint8)}
        return {8: (op_type, names, attrs, wide, "uint8", "uint8")}
