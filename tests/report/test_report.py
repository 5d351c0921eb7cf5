"""hessq.report: the HTML page (self-contained, every part drawn from its input) and the Markdown results table.

Inputs are real objects from the public API on a 5-layer residual net: made-up traces through
``Sensitivity``'s constructor, a ``plan_bits`` plan and a ``pareto_frontier``; a KL sensitivity
computed by ``kl_sensitivity``. The figures are checked by their pixels (the chosen plan's red star,
the colour of each bit width), not by how long they took or by their exact bytes.
"""

from __future__ import annotations

import base64
import io
import os
import pathlib
import re

import numpy as np
import pytest
import torch

from hessq.plan import evaluate_plan, pareto_frontier, plan_bits
from hessq.report import render_report, results_table, write_report
from hessq.report._plots import BIT_COLOURS
from hessq.sensitivity import kl_sensitivity
from tests._models import SHAPE, TinyResNet, make_sensitivity

PLOTS = ("accuracy-size", "sensitivity", "pareto", "bits")
CHOSEN_STAR = "#d73027"  # the chosen plan's marker on the Pareto curve


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    sens = make_sensitivity(model)
    plan = plan_bits(model, sens, weight_bits=(4, 8), size_limit="50%", input_shape=SHAPE)
    frontier = pareto_frontier(model, sens, weight_bits=(4, 8), num_points=8, input_shape=SHAPE)
    w8 = evaluate_plan(model, 8, sens, input_shape=SHAPE)
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    rows = [
        {"name": "FP32", "bits": "32/32", "accuracy": 0.9316, "size_bytes": fp32_bytes, "bops": 1.5e9, "latency_ms": 0.71},
        {"name": "W8A8", "bits": "8/8", "accuracy": 0.9320, "size_bytes": w8.size_bytes, "omega": w8.omega,
         "bops": 2.5e7, "latency_ms": 0.39, "latency_ms_b64": 60.0},
        {"name": "mixed", "bits": "4-8/8", "accuracy": 0.9029, "size_bytes": plan.size_bytes, "omega": plan.omega,
         "bops": 1.9e7, "latency_ms": 0.35, "note": "size ≤ 50%"},
    ]
    return {"model": model, "sens": sens, "plan": plan, "frontier": frontier, "rows": rows}


def _images(html: str) -> dict[str, np.ndarray]:
    """Every <img> of the page by id, decoded from its data URI to RGB pixels."""
    from matplotlib.image import imread

    found = re.findall(r"<img id=([\w-]+) alt='[^']*' src='data:image/png;base64,([^']+)'>", html)
    assert len(found) == html.count("<img"), "an image not embedded as a PNG data URI"
    out = {}
    for name, data in found:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), name
        out[name] = (imread(io.BytesIO(png), format="png")[..., :3] * 255).round().astype(int)
    return out


def _pixels_of(image: np.ndarray, colour: str, tol: int = 3) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image - rgb).max(-1) <= tol).sum())


def _full(parts, **overrides):
    kwargs = dict(title="TinyResNet <digits>", rows=parts["rows"], sensitivity=parts["sens"], frontier=parts["frontier"],
                  plan=parts["plan"], chosen="mixed", meta={"model": "TinyResNet", "limits": {"size": "50%"}},
                  notes=["latency: ONNX Runtime, batch 1"])
    return render_report(**{**kwargs, **overrides})


def test_the_page_is_self_contained(parts):
    html = _full(parts)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</body></html>")
    assert set(_images(html)) == set(PLOTS)
    # Nothing is fetched: no links, scripts, stylesheets or sources other than the embedded PNGs.
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<script|<link|<iframe|url\(|@import", html, re.IGNORECASE)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r"src='([^']*)'", html))
    # Text is escaped, not markup.
    assert "<title>TinyResNet &lt;digits&gt;</title>" in html and "<digits>" not in html


def test_the_page_holds_sensitivity_pareto_bits_and_results(parts):
    plan, rows = parts["plan"], parts["rows"]
    html = _full(parts)
    for heading in ("Results", "Per-layer sensitivity", "Pareto frontier", "Bits per layer"):
        assert f"<h2>{heading}</h2>" in html
    # The results table: one row per setting, Δ against the FP32 row, the chosen row highlighted.
    table = html.split("<h2>Results</h2>", 1)[1].split("</table>", 1)[0]
    assert [m for m in re.findall(r"<tr(?: class=chosen)?><td>([^<]+)</td>", table)] == ["FP32", "W8A8", "mixed"]
    assert "<tr class=chosen><td>mixed</td>" in table and table.count("class=chosen") == 1
    assert "<td class=num>93.20</td><td class=num>+0.04</td>" in table
    assert "<td class=num>90.29</td><td class=num>-2.87</td>" in table
    assert "latency b64 (ms)" in table and "<td class=num>60.00</td>" in table
    assert "size ≤ 50%" in table
    # The bits per layer: every layer of the plan with its width, the limit and the average.
    bits = html.split("<h2>Bits per layer</h2>", 1)[1]
    assert set(plan.values()) == {4, 8}, dict(plan)  # a real mix, so the figure shows two colours
    for layer, b in plan.items():
        assert f"<tr><td>{layer}</td><td class=num>{b}</td>" in bits
    assert f"Average weight bits: {plan.average_bits:.3f}" in bits and "size ≤" in bits
    # The figures draw what they were given: the chosen plan starred, each bit width in its colour.
    images = _images(html)
    assert _pixels_of(images["pareto"], CHOSEN_STAR) > 20
    for b in (4, 8):
        assert _pixels_of(images["bits"], BIT_COLOURS[b]) > 50, b
    assert "<td>model</td><td>TinyResNet</td>" in html and "latency: ONNX Runtime, batch 1" in html


def test_the_figures_follow_their_inputs(parts):
    model, sens = parts["model"], parts["sens"]
    all8 = plan_bits(model, sens, weight_bits=(8,), input_shape=SHAPE)
    html = _full(parts, plan=all8)
    images = _images(html)
    assert _pixels_of(images["bits"], BIT_COLOURS[4]) == 0 and _pixels_of(images["bits"], BIT_COLOURS[8]) > 50
    # Other traces give another sensitivity figure.
    other = _images(_full(parts, sensitivity=make_sensitivity(model, seed=1)))["sensitivity"]
    assert other.shape != images["sensitivity"].shape or not np.array_equal(other, images["sensitivity"])


def test_missing_optional_parts_still_render(parts):
    rows = [{"name": "FP32", "bits": "32/32", "accuracy": 0.95},
            {"name": "W8A8", "bits": "8/8", "accuracy": None, "size_bytes": None}]
    html = render_report(title="bare", rows=rows)
    assert html.rstrip().endswith("</body></html>") and "<img" not in html
    for absent in ("Per-layer sensitivity", "Pareto frontier", "Bits per layer"):
        assert absent not in html
    assert "<td>W8A8</td>" in html and html.count("<td class=num>—</td>") >= 8  # missing figures shown as —
    assert "latency b64" not in html
    # A frontier without a plan: the curve, with no chosen point.
    html = _full(parts, plan=None, chosen=None)
    images = _images(html)
    assert set(images) == {"accuracy-size", "sensitivity", "pareto"}
    assert _pixels_of(images["pareto"], CHOSEN_STAR) == 0
    assert "class=chosen" not in html


def test_a_kl_sensitivity_is_drawn(parts):
    model = parts["model"]
    g = torch.Generator().manual_seed(0)
    sens = kl_sensitivity(model, [torch.randn(8, *SHAPE, generator=g)], weight_bits=(4, 8), progress=False)
    html = render_report(title="kl", rows=parts["rows"], sensitivity=sens)
    assert set(_images(html)) == {"accuracy-size", "sensitivity"}


def test_results_table_in_markdown(parts):
    rows = parts["rows"] + [{"name": "W4A4", "bits": "4/4"}]
    lines = results_table(rows).splitlines()
    assert lines[0].startswith("| setting | weights / activations | top-1 (%) | Δ vs FP32 |")
    assert len(lines) == 2 + len(rows) and all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2] == f"| FP32 | 32/32 | 93.16 | +0.00 | {rows[0]['size_bytes'] / 1024:,.1f} | 1.500 | 0.710 |"
    assert lines[4].startswith("| mixed | 4-8/8 | 90.29 | -2.87 |")
    assert lines[5] == "| W4A4 | 4/4 | — | — | — | — | — |"
    # Without the reference row there is no Δ.
    assert results_table(rows[1:2]).splitlines()[2].startswith("| W8A8 | 8/8 | 93.20 | — |")


def test_write_report_is_atomic(parts, tmp_path):
    path = tmp_path / "report.html"
    write_report(path, title="first", rows=parts["rows"])
    assert os.listdir(tmp_path) == ["report.html"]
    assert path.read_text(encoding="utf-8") == render_report(title="first", rows=parts["rows"])
    # A report that cannot be rendered leaves the old file whole and no temporary beside it.
    with pytest.raises(KeyError):
        write_report(path, title="second", rows=[{"bits": "8/8"}])  # a row without a name
    assert os.listdir(tmp_path) == ["report.html"] and "<title>first</title>" in path.read_text(encoding="utf-8")
    write_report(path, title="third", rows=parts["rows"], plan=parts["plan"])
    assert os.listdir(tmp_path) == ["report.html"] and "<title>third</title>" in path.read_text(encoding="utf-8")


def test_a_write_that_fails_half_way_leaves_the_old_report(parts, tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    write_report(path, title="first", rows=parts["rows"])
    real_write_text = pathlib.Path.write_text

    def half_then_disk_full(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_report(path, title="second", rows=parts["rows"], sensitivity=parts["sens"])
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["report.html"]
    assert path.read_text(encoding="utf-8") == render_report(title="first", rows=parts["rows"])


def test_a_stack_of_blocks_gets_a_grid_of_bits_per_block_and_matrix():
    from hessq.plan import BitPlan
    from hessq.report._html import _block_grid

    parts = ("attention.self.query", "attention.self.key", "intermediate.dense")
    bits = {f"bert.encoder.layer.{i}.{p}": 2 + (i + j) % 4 for i in range(3) for j, p in enumerate(parts)}
    bits.update({"bert.embeddings.word_embeddings": 3, "classifier": 8})
    page = render_report(title="t", rows=[], plan=BitPlan(bits, 8))
    grid = _block_grid(BitPlan(bits, 8))
    assert grid in page and "id=block-bits" in grid
    # one row per block, one column per matrix, each cell that layer's bits; the rest listed below
    for i in range(3):
        cells = "".join(f"<td class=num>{bits[f'bert.encoder.layer.{i}.{p}']}</td>" for p in parts)
        assert f"<tr><td>{i}</td>{cells}</tr>" in grid
    assert "bert.embeddings.word_embeddings: 3" in grid and "classifier: 8" in grid
    # a network without repeated blocks gets none
    assert _block_grid(BitPlan({"conv1": 8, "layer1.0.conv1": 4, "fc": 8}, 8)) == ""


def test_a_table_in_row_tiers_is_shown_with_its_rows_widths():
    from hessq.plan import BitPlan
    from hessq.report._html import _block_grid

    bits = {f"bert.encoder.layer.{i}.output.dense": 3 for i in range(2)} | {"bert.embeddings.word_embeddings": 2}
    signature = {n: [10, 4] for n in bits}
    plan = BitPlan(bits, 8, signature=signature, row_bits={"bert.embeddings.word_embeddings": {8: [0, 1], 4: [5]}})
    # 7 rows at 2 bits, 2 at 8, 1 at 4: the mean width over the table's rows
    assert plan.layer_average_bits("bert.embeddings.word_embeddings") == pytest.approx((7 * 2 + 2 * 8 + 4) / 10)
    assert plan.layer_average_bits("bert.encoder.layer.0.output.dense") == 3.0
    assert plan.layer_bits_text("bert.embeddings.word_embeddings") == "2 (2 rows at 8, 1 row at 4)"
    page = render_report(title="t", rows=[], plan=plan)
    shown = "2 (2 rows at 8, 1 row at 4)"
    assert f"<tr><td>bert.embeddings.word_embeddings</td><td class=num>{shown}</td>" in page
    assert f"bert.embeddings.word_embeddings: {shown}" in _block_grid(plan)
    # the bar is drawn at the mean width, in the base width's colour (a 2-bit bar 3.4 high, not 2; its hatch covers
    # part of it: about 1.33 times the flat bar's pixels, against at most 1 if drawn at 2)
    tall = _images(page)["bits"]
    flat = _images(render_report(title="t", rows=[], plan=BitPlan(bits, 8, signature=signature)))["bits"]
    assert _pixels_of(tall, BIT_COLOURS[2]) > 1.15 * _pixels_of(flat, BIT_COLOURS[2]) > 0
