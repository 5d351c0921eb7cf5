"""hessq.compress and `hessq compress` end to end on a small net and scikit-learn's digits."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

import hessq
from hessq.cli import main
from tests.pipeline._tiny import digits_data, trained_tiny_net

PLOTS = ("accuracy-size", "sensitivity", "pareto", "bits")
FILES = ("sensitivity.json", "plan.json", "model.hq", "model.onnx", "results.json", "results.md", "report.html")


@pytest.fixture(scope="module")
def tiny():
    return trained_tiny_net()


def _plots(html: str) -> dict[str, bytes]:
    found = re.findall(r"<img id=([\w-]+) alt='[^']*' src='data:image/png;base64,([^']+)'", html)
    return {name: base64.b64decode(data) for name, data in found}


def test_compress_returns_every_artefact_and_keeps_its_promises(tiny, tmp_path):
    train, evaluation = digits_data()
    result = hessq.compress(tiny, train, eval_data=evaluation, size_limit="50%", finetune=hessq.FinetuneConfig(epochs=1),
                            out_dir=tmp_path, latency_repeats=3, progress=False)
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


def test_report_is_self_contained_with_every_plot(tiny, tmp_path):
    train, evaluation = digits_data()
    result = hessq.compress(tiny, train, eval_data=evaluation, bops_limit="60%", out_dir=tmp_path, latency_repeats=3,
                            progress=False)
    html = (tmp_path / "report.html").read_text()
    plots = _plots(html)
    assert set(plots) == set(PLOTS)
    for name, png in plots.items():
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000, name
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for layer in result.plan:  # the per-layer table names every layer
        assert f"<td>{layer}</td>" in html
    for row in result.rows:
        assert f"<td>{row['name']}</td>" in html


def test_command_line_writes_every_file(tiny, tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), weights)
    out = tmp_path / "out"
    code = main(["compress", "--model", "tests.pipeline._tiny:tiny_net", "--checkpoint", str(weights),
                 "--data", "tests.pipeline._tiny:digits_data", "--size-limit", "50%", "--finetune-epochs", "1",
                 "--pareto-points", "10", "--out", str(out), "--no-progress"])
    assert code == 0
    for f in FILES:
        assert (out / f).exists(), f
    assert set(_plots((out / "report.html").read_text())) == set(PLOTS)
    printed = capsys.readouterr().out
    assert "| mixed |" in printed and str(out / "report.html") in printed
    # The exported ONNX graph runs in ONNX Runtime and equals the integer model bit for bit.
    import onnxruntime as ort

    imodel = hessq.load_integer(out / "model.hq")
    _, evaluation = digits_data()
    x = next(iter(evaluation))[0]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_array_equal(onnx_out, imodel(x).numpy())


def test_command_line_data_free(tiny, tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), weights)
    out = tmp_path / "out"
    code = main(["compress", "--model", "tests.pipeline._tiny:tiny_net", "--checkpoint", str(weights), "--data", "none",
                 "--input-shape", "1,8,8", "--distilled-samples", "32", "--distill-steps", "30", "--no-latency",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["data"].startswith("none") and saved["meta"]["distilled_statistics_loss"] >= 0
    assert all("accuracy" not in r for r in saved["rows"])  # no data, no labels: nothing to score
    # The data-free integer model still classifies real digits far above chance.
    imodel = hessq.load_integer(out / "model.hq")
    assert hessq.accuracy(imodel, digits_data()[1]) > 0.7


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no_such_package.models:net"], "cannot load model factory 'no_such_package.models:net'"),
        (["--model", "tests.pipeline._tiny:not_a_model"], "returned a str, not a torch.nn.Module"),
        (["--model", "tests.pipeline._tiny:tiny_net", "--data", "no_such_package:data"], "cannot import the data module"),
        (["--model", "tests.pipeline._tiny:tiny_net", "--data", "tests.pipeline._tiny:not_a_model"], "returned a str"),
        (["--model", "tests.pipeline._tiny:tiny_net", "--data", "none"], "--input-shape"),
    ],
)
def test_bad_model_or_data_paths_say_what_is_wrong(args, message, tmp_path, capsys):
    assert main(["compress", *args, "--out", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "hessq compress: error:" in err and message in err
    assert not (tmp_path / "results.json").exists()


def test_kl_sensitivity_plans_without_a_frontier(tiny):
    train, evaluation = digits_data()
    result = hessq.compress(tiny, train, eval_data=evaluation, sensitivity="kl", size_limit="50%", baselines=(),
                            measure_latency=False, progress=False)
    assert result.frontier is None and hessq.sensitivity.is_kl_sensitivity(result.sensitivity)
    assert [r["name"] for r in result.rows] == ["FP32", "mixed"]
    assert result.rows[1]["accuracy"] > result.rows[0]["accuracy"] - 0.05


def test_bad_arguments_fail_before_any_work(tiny):
    train, _ = digits_data()
    with pytest.raises(ValueError, match="sensitivity must be"):
        hessq.compress(tiny, train, sensitivity="fisher")
    with pytest.raises(TypeError, match="finetune must be"):
        hessq.compress(tiny, train, finetune=3)
    with pytest.raises(ValueError, match="onnx_mode"):
        hessq.compress(tiny, train, onnx_mode="turbo")
