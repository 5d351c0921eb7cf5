"""The one normalising pass: every form of a known op (``F.relu``, ``torch.relu``, ``x.relu()``, ``nn.ReLU``)
becomes its family's canonical function call, so every later pass and stage sees one graph."""

from __future__ import annotations

import torch.fx as fx

from hessq.ops import canonical_function, family_of


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place so that each op a family has a canonical form for is called in that form."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    for node in list(graph.nodes):
        family = family_of(node, modules)
        canonical = canonical_function(family) if family is not None else None
        if canonical is None:
            continue
        module = modules[node.target] if node.op == "call_module" else None
        call = family.canonical_call(node, module)
        if call is None:
            continue
        args, kwargs = call
        with graph.inserting_before(node):
            new = graph.call_function(canonical, tuple(args), dict(kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
