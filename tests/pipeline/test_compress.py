"""hessq.compress and `hessq compress` end to end on a small net and scikit-learn's digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hessq
from tests.pipeline._tiny import FILES, PLOTS, digits_data, plots, trained_tiny_net



@pytest.fixture(scope="module")
def tiny():
    return trained_tiny_net()


def test_compress_returns_every_artefact_and_keeps_its_promises(tiny, tmp_path):
    train, evaluation = digits_data()
    plan = hessq.PlanConfig(size_limit="50%", latency_repeats=3)
    result = hessq.compress(tiny, train, eval_data=evaluation, plan=plan, finetune=hessq.FinetuneConfig(epochs=1),
                            out_dir=tmp_path, progress=False)
    # The plan honours the limit: halfway between all-4 and all-8 (first/last pinned at 8).
    lo = hessq.plan.evaluate_plan(tiny, {n: (8 if n in ("conv1", "fc") else 4) for n in result.plan}).size_bytes
    hi = hessq.plan.evaluate_plan(tiny, 8).size_bytes
    assert result.plan.size_bytes <= lo + 0.5 * (hi - lo) + 1e-9
    assert set(result.plan.values()) <= {4, 8} and result.plan["conv1"] == result.plan["fc"] == 8
    # What was evaluated is what is deployed: the integer model equals the fake-quant model.
    assert result.verification["bit_exact"] is True
    x = torch.cat([b[0] for b in evaluation])
    with torch.no_grad():
        assert torch.equal(result.imodel(x), result.qmodel.eval()(x))
    names = [r["name"] for r in result.rows]
    assert names == ["FP32", "W8A8", "W4A8", "mixed"]
    acc = {r["name"]: r["accuracy"] for r in result.rows}
    assert acc["FP32"] > 0.9 and acc["mixed"] > acc["FP32"] - 0.05 and acc["W8A8"] > acc["FP32"] - 0.02
    assert acc["mixed"] == hessq.accuracy(result.imodel, evaluation)
    sizes = {r["name"]: r["size_bytes"] for r in result.rows}
    assert sizes["W4A8"] < sizes["mixed"] < sizes["W8A8"] < sizes["FP32"]
    # Files: every one written, and each loads back to what was returned.
    for f in FILES + ("pareto.json", "latency.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert hessq.BitPlan.load(tmp_path / "plan.json") == result.plan
    assert torch.equal(hessq.load_integer(tmp_path / "model.hq")(x), result.imodel(x))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["verification"]["bit_exact"] and [r["name"] for r in saved["rows"]] == names
    assert set(saved["timings_s"]) >= {"sensitivity", "quantization-aware training", "integer model and verification"}
    # results.json records every stage's config, and each reads back to the one that ran.
    assert hessq.PlanConfig.from_dict(saved["configs"]["plan"]) == plan
    assert hessq.FinetuneConfig.from_dict(saved["configs"]["finetune"]) == hessq.FinetuneConfig(epochs=1)
    assert hessq.SensitivityConfig.from_dict(saved["configs"]["sensitivity"]) == hessq.SensitivityConfig()


def test_report_is_self_contained_with_every_plot(tiny, tmp_path):
    train, evaluation = digits_data()
    result = hessq.compress(tiny, train, eval_data=evaluation, plan=hessq.PlanConfig(bops_limit="60%", latency_repeats=3),
                            out_dir=tmp_path, progress=False)
    html = (tmp_path / "report.html").read_text()
    found = plots(html)
    assert set(found) == set(PLOTS)
    for name, png in found.items():
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000, name
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for layer in result.plan:  # the per-layer table names every layer
        assert f"<td>{layer}</td>" in html
    for row in result.rows:
        assert f"<td>{row['name']}</td>" in html


def test_kl_sensitivity_plans_without_a_frontier(tiny):
    train, evaluation = digits_data()
    result = hessq.compress(tiny, train, eval_data=evaluation, sensitivity=hessq.SensitivityConfig(method="kl"),
                            plan=hessq.PlanConfig(size_limit="50%", measure_latency=False),
                            quantize=hessq.QuantizeConfig(baselines=()), progress=False)
    assert result.frontier is None and hessq.sensitivity.is_kl_sensitivity(result.sensitivity)
    assert [r["name"] for r in result.rows] == ["FP32", "mixed"]
    assert result.rows[1]["accuracy"] > result.rows[0]["accuracy"] - 0.05


def test_bad_arguments_fail_before_any_work(tiny):
    train, _ = digits_data()
    with pytest.raises(ValueError, match="SensitivityConfig.method must be"):
        hessq.compress(tiny, train, sensitivity=hessq.SensitivityConfig(method="fisher"))
    with pytest.raises(TypeError, match="finetune must be"):
        hessq.compress(tiny, train, finetune=3)
    with pytest.raises(ValueError, match="ExportConfig.onnx_mode"):
        hessq.compress(tiny, train, export=hessq.ExportConfig(onnx_mode="turbo"))
