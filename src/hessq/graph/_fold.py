"""Folding BatchNorm into the weighted layer before it, through the layer's op family."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from hessq.ops import family_of_module, fold_conv_bn  # noqa: F401  (fold_conv_bn: re-exported by hessq.graph)


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold every BatchNorm whose input is a weighted layer used by nothing else; returns the folded BN paths.

    The layer keeps its module path; the BN disappears from the graph.
    """
    modules = dict(gm.named_modules())
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        family = family_of_module(modules[src.target])
        replacement = family.fold_batchnorm(modules[src.target], modules[node.target]) if family is not None else None
        if replacement is None:
            continue
        gm.set_submodule(src.target, replacement)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(node.target)
    for target in folded:
        gm.delete_submodule(target)
    gm.graph.lint()
    gm.recompile()
    return folded
