"""Fast-export graph pass: int8 Linears that read the same codes run as one MatMulIntegerToFloat.

A transformer's query, key and value projections read one LayerNorm's uint8 codes, at one scale and zero point.
Stacking their int8 weights side by side (and their per-row scales and biases) gives one GEMM of N = 3·384 instead of
three of 384, followed by a Split along the last axis. Every output element is the same int32 dot product, scaled and
biased by the same column's numbers, so the values do not change. It saves two kernel calls per layer, which pays
where calls are short: on MiniLM at T=64, batch 1 runs 3–4% faster. At batch 32 the Split's copy of the wide output
costs more than the saved calls, about 3% (bench/ibert_pair.py), hence ``export_onnx(fuse_siblings=False)``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

MS_DOMAIN = "com.microsoft"


def _sibling_key(node, arrays: dict[str, np.ndarray]) -> tuple | None:
    """What members of one fused GEMM must share, or None for a node the pass leaves alone: an int8 weight held as
    a constant (with constant scales and bias, one per column or one in all), one input scale and zero point, the
    same reduction length, the same weight zero point (none for int8 weights, one constant for uint8 ones)."""
    if node.op_type != "MatMulIntegerToFloat" or node.domain != MS_DOMAIN:
        return None
    ins = list(node.input) + [""] * (7 - len(node.input))
    a, w, a_scale, w_scale, a_zp, w_zp, bias = ins[:7]
    if w not in arrays or a_scale not in arrays or w_scale not in arrays or (bias and bias not in arrays) \
            or (w_zp and (w_zp not in arrays or arrays[w_zp].size != 1)):
        return None
    weight = arrays[w]
    if weight.ndim != 2 or weight.dtype not in (np.int8, np.uint8) or (weight.dtype == np.uint8) != bool(w_zp) \
            or arrays[a_scale].size != 1 \
            or arrays[w_scale].size not in (1, weight.shape[1]) or (bias and arrays[bias].size != weight.shape[1]):
        return None
    zp = arrays[a_zp].item() if a_zp in arrays else 0 if not a_zp else None
    if zp is None:  # a zero point computed at run time: the members cannot be shown to share it
        return None
    w_zero = (weight.dtype.str, int(arrays[w_zp].item())) if w_zp else (weight.dtype.str, 0)
    return a, float(arrays[a_scale].item()), int(zp), weight.shape[0], w_zero


def fuse_sibling_matmuls(nodes: list, inits: list, helper, numpy_helper) -> tuple[list, list]:
    """``nodes`` and ``inits`` with every group of at least two sibling MatMulIntegerToFloat nodes (see
    :func:`_sibling_key`) replaced by one over the stacked weights and a Split into the members' outputs, placed
    where the group's first member was. The members' own constants are left for the exporter's prune."""
    arrays = {t.name: numpy_helper.to_array(t) for t in inits}
    groups: dict[tuple, list] = defaultdict(list)
    for n in nodes:
        key = _sibling_key(n, arrays)
        if key is not None:
            groups[key].append(n)
    groups = {k: g for k, g in groups.items() if len(g) > 1}
    if not groups:
        return nodes, inits
    inits = list(inits)
    first: dict[int, list] = {}
    members: set[int] = set()
    for i, group in enumerate(groups.values()):
        stem = f"siblings{i}"
        ins = [list(n.input) + [""] * (7 - len(n.input)) for n in group]
        widths = [arrays[x[1]].shape[1] for x in ins]
        weight = np.concatenate([arrays[x[1]] for x in ins], axis=1)
        w_scale = np.concatenate([np.broadcast_to(arrays[x[3]].astype(np.float32).reshape(-1), (n,))
                                  for x, n in zip(ins, widths)])
        bias = np.concatenate([arrays[x[6]].astype(np.float32).reshape(n) if x[6] else np.zeros(n, np.float32)
                               for x, n in zip(ins, widths)])
        for name, value in ((f"{stem}_wT", weight), (f"{stem}_w_scale", w_scale), (f"{stem}_bias", bias),
                            (f"{stem}_widths", np.asarray(widths, np.int64))):
            inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        a, _, a_scale, _, a_zp, w_zp = ins[0][:6]
        wide = f"{stem}_out"
        first[id(group[0])] = [
            helper.make_node("MatMulIntegerToFloat", [a, f"{stem}_wT", a_scale, f"{stem}_w_scale", a_zp, w_zp,
                                                      f"{stem}_bias"], [wide], name=wide, domain=MS_DOMAIN),
            helper.make_node("Split", [wide, f"{stem}_widths"], [n.output[0] for n in group], name=f"{stem}_split",
                             axis=-1),
        ]
        members.update(id(n) for n in group)
    out = []
    for n in nodes:
        out.extend(first.get(id(n), []))
        if id(n) not in members:
            out.append(n)
    return out, inits
