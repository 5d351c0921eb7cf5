"""The report's figures, drawn with matplotlib's object API (no pyplot: no global figure state)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from hessq._errors import MissingDependencyError

BIT_COLOURS = {2: "#d73027", 3: "#f46d43", 4: "#fdae61", 5: "#fee08b", 6: "#d9ef8b", 7: "#a6d96a", 8: "#1a9850"}


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "the HTML report draws its plots with matplotlib, which is not installed: "
            "pip install matplotlib (or pass report=False)"
        ) from exc
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def to_data_uri(fig) -> str:
    """The figure as an embedded PNG (``data:image/png;base64,...``), so the page needs no server."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def _layer_axis(ax, names: Sequence[str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)


def error_bar_limits(values: Sequence[float], errors: Sequence[float], log: bool) -> list[list[float]]:
    """[lower, upper] bar lengths for ``values`` ± ``errors``; on a log axis the lower one stops short of zero."""
    lower = [min(e, 0.95 * v) if log else e for v, e in zip(values, errors)]
    return [lower, list(errors)]


def sensitivity_bars(names: Sequence[str], values: Sequence[float], errors: Sequence[float] | None, ylabel: str,
                     title: str, exact: Sequence[bool] | None = None) -> str:
    """Per-layer sensitivity as bars in network order (log scale when it spans decades), each with its
    ± standard-error bar; layers whose value is exact (``exact``) are marked instead."""
    fig = _figure(max(6.0, 0.32 * len(names) + 2), 3.6)
    ax = fig.subplots()
    positive = [v for v in values if v > 0]
    log = bool(positive) and max(positive) / min(positive) > 100 and len(positive) == len(values)
    yerr = error_bar_limits(values, errors, log) if errors is not None else None
    ax.bar(range(len(names)), values, yerr=yerr, color="#4575b4", ecolor="#222", capsize=2,
           label="± 1 standard error" if errors is not None else None)
    if exact is not None and any(exact):
        xs = [i for i, e in enumerate(exact) if e]
        ax.plot(xs, [values[i] for i in xs], "_", color="#d73027", markersize=9, markeredgewidth=2,
                label="exact (standard error 0)")
    if log:
        ax.set_yscale("log")
    _layer_axis(ax, names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if errors is not None or (exact is not None and any(exact)):
        ax.legend(fontsize=8)
    return to_data_uri(fig)


def pareto_curve(points: Sequence[tuple[float, float]], chosen: tuple[float, float] | None,
                 others: Mapping[str, tuple[float, float]] | None = None) -> str:
    """Ω against size (KB) along the frontier, the chosen plan marked, reference settings as crosses."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    if points:
        xs, ys = zip(*[(s / 1024, o) for s, o in points])
        ax.step(xs, ys, where="post", color="#4575b4", alpha=0.5)
        ax.plot(xs, ys, "o", color="#4575b4", markersize=3, label=f"Pareto frontier ({len(points)} plans)")
    for name, (s, o) in (others or {}).items():
        ax.plot([s / 1024], [o], "x", markersize=8, label=name)
    if chosen is not None:
        ax.plot([chosen[0] / 1024], [chosen[1]], "*", color="#d73027", markersize=16, label="chosen plan", zorder=5)
    ys_all = [o for _, o in points] + ([chosen[1]] if chosen else []) + [o for _, o in (others or {}).values()]
    if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 100:
        ax.set_yscale("log")
    return _finish(fig, ax, "model size (KB)", "Ω  (Σ Tr(H)/n · ‖Q(W) − W‖²)", "size – perturbation frontier")


def bits_along_network(names: Sequence[str], weight_bits: Sequence[int], act_bits: Sequence[int | None],
                       num_params: Sequence[int | None], mean_bits: Sequence[float | None] | None = None) -> str:
    """Weight bits per layer drawn in network order, coloured by width; activation bits as a line.

    ``mean_bits``: a layer whose rows have several widths (an embedding table in row tiers) is drawn at its mean
    width, hatched, in the colour of its base width."""
    fig = _figure(max(6.0, 0.32 * len(names) + 2), 3.4)
    ax = fig.subplots()
    colours = [BIT_COLOURS.get(int(b), "#888") for b in weight_bits]
    heights = [m if m is not None else b for b, m in zip(weight_bits, mean_bits or [None] * len(names))]
    bars = ax.bar(range(len(names)), heights, color=colours, edgecolor="#333", linewidth=0.5, label="weight bits")
    for bar, b, h in zip(bars, weight_bits, heights):
        if h != b:
            bar.set_hatch("//")
            ax.text(bar.get_x() + bar.get_width() / 2, h + 0.05, f"{h:.2f}", ha="center", va="bottom", fontsize=6)
    if any(a is not None for a in act_bits):
        ax.plot(range(len(names)), [a if a is not None else math.nan for a in act_bits], "k_", markersize=14,
                markeredgewidth=2, label="activation bits")
    for i, n in enumerate(num_params):
        if n:
            ax.text(i, 0.3, f"{n / 1000:.1f}k" if n >= 1000 else str(n), ha="center", va="bottom", fontsize=6, rotation=90)
    _layer_axis(ax, names)
    ax.set_ylim(0, max(list(weight_bits) + heights + [a or 0 for a in act_bits]) + 1)
    ax.set_ylabel("bits")
    ax.set_title("bits per layer along the network (labels: parameters; hatched: mean of rows in tiers)"
                 if heights != list(weight_bits) else "bits per layer along the network (labels: parameters)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return to_data_uri(fig)


def accuracy_vs_size(rows: Sequence[Mapping[str, Any]]) -> str:
    """Accuracy against size for every evaluated setting: the trade-off the table lists."""
    fig = _figure(6.4, 3.8)
    ax = fig.subplots()
    for r in rows:
        if r.get("accuracy") is None or r.get("size_bytes") is None:
            continue
        ax.plot([r["size_bytes"] / 1024], [100 * r["accuracy"]], "o", markersize=7, label=r["name"])
    ax.set_xscale("log")
    return _finish(fig, ax, "model size (KB, log)", "top-1 (%)", "accuracy against size")
