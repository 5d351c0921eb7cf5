"""The HTML report: one self-contained page (figures embedded as PNG data URIs, no scripts)."""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from hessq._io import write_text_atomic
from hessq.plan import BitPlan, ParetoFrontier
from hessq.report import _plots
from hessq.sensitivity import Sensitivity, is_kl_sensitivity

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { background: #fff3e0; font-weight: 600; }
img { max-width: 100%; } .meta td:first-child { color: #555; } .note { color: #555; font-size: 0.9em; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _results_table(rows: Sequence[Mapping[str, Any]], reference: float | None, chosen: str | None,
                   metric: str = "top-1") -> str:
    has_b64 = any(r.get("latency_ms_b64") is not None for r in rows)
    head = ["setting", "weights / activations", f"{_esc(metric)} (%)", "Δ vs FP32", "size (KB)", "BOPs (G)", "latency b1 (ms)"]
    if has_b64:
        head.append("latency b64 (ms)")
    head.append("notes")
    out = ["<table>", "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        acc = r.get("accuracy")
        delta = None if acc is None or reference is None else 100 * (acc - reference)
        cells = [
            f"<td>{_esc(r['name'])}</td>",
            f"<td>{_esc(r.get('bits', ''))}</td>",
            f"<td class=num>{_num(None if acc is None else 100 * acc, '.2f')}</td>",
            f"<td class=num>{_num(delta, '+.2f')}</td>",
            f"<td class=num>{_num(None if r.get('size_bytes') is None else r['size_bytes'] / 1024, ',.1f')}</td>",
            f"<td class=num>{_num(None if r.get('bops') is None else r['bops'] / 1e9, ',.3f')}</td>",
            f"<td class=num>{_num(r.get('latency_ms'), '.3f')}</td>",
        ]
        if has_b64:
            cells.append(f"<td class=num>{_num(r.get('latency_ms_b64'), '.2f')}</td>")
        cells.append(f"<td class=note>{_esc(r.get('note', ''))}</td>")
        cls = " class=chosen" if chosen is not None and r["name"] == chosen else ""
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _sensitivity_figure(sens: Sensitivity) -> str:
    names = list(sens)
    if is_kl_sensitivity(sens):
        # ZeroQ's KL at the lowest bit width measured: the width where layers differ most.
        lowest = min(int(b) for b in sens[names[0]].extra["kl"])
        values = [max(float(sens[n].extra["kl"][str(lowest)] if str(lowest) in sens[n].extra["kl"]
                            else sens[n].extra["kl"][lowest]), 1e-12) for n in names]
        return _plots.sensitivity_bars(names, values, None, f"KL(FP32 ‖ layer at {lowest} bits)",
                                       "per-layer sensitivity (ZeroQ KL, one layer quantized at a time)")
    values = [sens[n].trace / max(sens[n].num_params, 1) for n in names]
    errors = [sens[n].trace_stderr / max(sens[n].num_params, 1) for n in names]
    exact = [sens[n].trace_stderr == 0 for n in names]
    return _plots.sensitivity_bars(names, values, errors, "Tr(H) / n  (± standard error)",
                                   "per-layer sensitivity (trace of each layer's Hessian block)", exact=exact)


def _sensitivity_precision(sens: Sensitivity) -> str:
    """Each layer's trace ± its standard error, the estimator and the precision reached, as a table."""
    if is_kl_sensitivity(sens):
        return ""
    m = sens.meta
    exact = sum(r.trace_stderr == 0 for r in sens.values())
    head = (f"<p class=note>Error bars: ± 1 standard error of each layer's trace; {exact} of {len(sens)} layers exact. "
            + (f"Target relative standard error (rtol) {_num(m.get('rtol'), '.3g')}: "
               + ("every layer reached it." if m.get("converged") else
                  f"<b>not reached</b> by {_esc(', '.join(m.get('short_layers') or []) or 'some layers')}.")
               if "rtol" in m else "") + "</p>")
    out = [head, "<table><tr><th>layer</th><th>estimator</th><th>Tr(H)</th><th>± standard error</th>"
                 "<th>relative</th><th>samples</th></tr>"]
    for name, r in sens.items():
        rel = r.trace_stderr / abs(r.trace) if r.trace else None
        out.append(f"<tr><td>{_esc(name)}</td><td>{_esc(r.extra.get('estimator', ''))}</td>"
                   f"<td class=num>{_num(r.trace, '.4g')}</td><td class=num>{_num(r.trace_stderr, '.3g')}</td>"
                   f"<td class=num>{_num(rel, '.1%')}</td><td class=num>{_num(r.extra.get('samples'), 'd')}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _plan_table(plan: BitPlan) -> str:
    out = ["<table>", "<tr><th>layer</th><th>weight bits</th><th>parameters</th><th>size (B)</th><th>BOPs (M)</th>"
           "<th>Ω</th></tr>"]
    for name, bits in plan.items():
        d = plan.layers.get(name, {})
        out.append(
            f"<tr><td>{_esc(name)}</td><td class=num>{_esc(plan.layer_bits_text(name))}</td><td class=num>{_num(d.get('num_params'), ',d')}</td>"
            f"<td class=num>{_num(d.get('size_bytes'), ',.0f')}</td>"
            f"<td class=num>{_num(None if d.get('bops') is None else d['bops'] / 1e6, ',.2f')}</td>"
            f"<td class=num>{_num(d.get('omega'), '.3g')}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def render_report(
    *,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    sensitivity: Sensitivity | None = None,
    frontier: ParetoFrontier | None = None,
    plan: BitPlan | None = None,
    chosen: str | None = None,
    reference: str = "FP32",
    meta: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    metric: str = "top-1",
) -> str:
    """The report as one HTML string.

    ``rows``: one dict per evaluated setting with ``name``, ``bits`` and any of ``accuracy`` (0–1),
    ``size_bytes``, ``bops``, ``latency_ms``, ``latency_ms_b64``, ``note``; the row named ``reference``
    gives the Δ column and the row named ``chosen`` is highlighted and marked on the Pareto curve.
    Each figure appears when its input is given: per-layer sensitivity bars, the size–Ω Pareto curve
    with the chosen plan, bits per layer along the network (and, for a stack of repeated blocks such as a
    transformer's encoder layers, a grid of bits per block and matrix), and accuracy against size.
    ``metric`` names the accuracy column (``top-1``, ``mAP``).
    """
    ref = next((r.get("accuracy") for r in rows if r["name"] == reference), None)
    parts = [
        "<!DOCTYPE html>",
        f"<html lang=en><head><meta charset=utf-8><title>{_esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    if meta:
        parts.append("<table class=meta>" + "".join(
            f"<tr><td>{_esc(k)}</td><td>{_esc(v if isinstance(v, str) else json.dumps(v))}</td></tr>" for k, v in meta.items()
        ) + "</table>")
    parts += ["<h2>Results</h2>", _results_table(rows, ref, chosen, metric)]
    if any(r.get("accuracy") is not None and r.get("size_bytes") is not None for r in rows):
        parts.append(f"<img id=accuracy-size alt='accuracy against size' src='{_plots.accuracy_vs_size(rows)}'>")
    parts += [f"<p class=note>{_esc(n)}</p>" for n in notes]
    if sensitivity is not None:
        parts += ["<h2>Per-layer sensitivity</h2>",
                  f"<img id=sensitivity alt='per-layer sensitivity' src='{_sensitivity_figure(sensitivity)}'>",
                  _sensitivity_precision(sensitivity)]
    if frontier is not None:
        chosen_point = None
        if plan is not None and plan.size_bytes is not None and plan.omega is not None:
            chosen_point = (plan.size_bytes, plan.omega)
        others = {r["name"]: (r["size_bytes"], r["omega"]) for r in rows
                  if r["name"] != chosen and r.get("omega") is not None and r.get("size_bytes") is not None}
        curve = _plots.pareto_curve([(p.size_bytes, p.omega) for p in frontier], chosen_point, others)
        parts += ["<h2>Pareto frontier</h2>", f"<img id=pareto alt='Pareto frontier' src='{curve}'>"]
    if plan is not None:
        names = list(plan)
        act = [plan.act_bits] * len(names)
        params = [plan.layers.get(n, {}).get("num_params") for n in names]
        limits = ", ".join(f"{k} ≤ {v:,.4g}" for k, v in plan.limits.items()) or "none"
        parts += [
            "<h2>Bits per layer</h2>",
            f"<img id=bits alt='bits per layer' src='{_plots.bits_along_network(names, [plan[n] for n in names], act, params, [plan.layer_average_bits(n) for n in names])}'>",
            f"<p>Limits solved under: {_esc(limits)}. Average weight bits: {_num(plan.average_bits, '.3f')}.</p>",
            _block_grid(plan),
            _plan_table(plan),
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, **kwargs: Any) -> None:
    """:func:`render_report` written atomically to ``path``."""
    write_text_atomic(path, render_report(**kwargs))


_BLOCK = re.compile(r"^(?P<stack>.*?\.?layers?)\.(?P<index>\d+)\.(?P<part>.+)$")


def _block_grid(plan: BitPlan) -> str:
    """Bits per repeated block (rows) and matrix within it (columns): ``bert.encoder.layer.3.attention.self.query``
    is block 3, matrix ``attention.self.query``. Empty when the layers do not form such a stack."""
    grid: dict[str, dict[str, int]] = {}
    parts: list[str] = []
    others = []
    for name in plan:
        m = _BLOCK.match(name)
        if m is None:
            others.append(name)
            continue
        grid.setdefault(m["index"], {})[m["part"]] = plan[name]
        if m["part"] not in parts:
            parts.append(m["part"])
    if len(grid) < 2:
        return ""
    head = "".join(f"<th>{_esc(p)}</th>" for p in parts)
    body = "".join(f"<tr><td>{_esc(i)}</td>" + "".join(f"<td class=num>{_num(cols.get(p), 'd')}</td>" for p in parts)
                   + "</tr>" for i, cols in grid.items())
    rest = ", ".join(f"{_esc(n)}: {_esc(plan.layer_bits_text(n))}" for n in others)
    return (f"<h3>Bits per block and matrix</h3><table id=block-bits><tr><th>block</th>{head}</tr>{body}</table>"
            + (f"<p>Outside the blocks: {rest}.</p>" if rest else ""))


def results_table(rows: Sequence[Mapping[str, Any]], reference: str = "FP32", metric: str = "top-1") -> str:
    """The rows as a Markdown table (for results.md and the terminal); ``metric`` names the accuracy column."""
    ref = next((r.get("accuracy") for r in rows if r["name"] == reference), None)
    lines = [f"| setting | weights / activations | {metric} (%) | Δ vs FP32 | size (KB) | BOPs (G) | latency b1 (ms) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = r.get("accuracy")
        cells = [
            _num(None if acc is None else 100 * acc, ".2f"),
            _num(None if acc is None or ref is None else 100 * (acc - ref), "+.2f"),
            _num(None if r.get("size_bytes") is None else r["size_bytes"] / 1024, ",.1f"),
            _num(None if r.get("bops") is None else r["bops"] / 1e9, ",.3f"),
            _num(r.get("latency_ms"), ".3f"),
        ]
        lines.append(f"| {r['name']} | {r.get('bits', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
