"""Folding BatchNorm into the convolution before it: W' = W·γ/σ, b' = (b − μ)·γ/σ + β."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from hessq._errors import ConfigError


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing conv followed by bn (in eval mode, with its running statistics)."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise ConfigError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    folded.weight.copy_(conv.weight * factor.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded.bias.copy_((bias - bn.running_mean) * factor + beta)
    return folded


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold every BatchNorm2d whose input is a Conv2d used by nothing else; returns the folded BN paths.

    The conv keeps its module path; the BN disappears from the graph.
    """
    modules = dict(gm.named_modules())
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), nn.Conv2d)):
            continue
        if len(src.users) != 1:
            continue
        gm.set_submodule(src.target, fold_conv_bn(modules[src.target], modules[node.target]))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(node.target)
    for target in folded:
        gm.delete_submodule(target)
    gm.graph.lint()
    gm.recompile()
    return folded
