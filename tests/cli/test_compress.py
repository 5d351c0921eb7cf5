"""`hessq compress` end to end on a small net and scikit-learn's digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hessq
from hessq.cli import main
from tests.pipeline._tiny import FILES, PLOTS, digits_data, plots, trained_tiny_net


@pytest.fixture(scope="module")
def tiny():
    return trained_tiny_net()


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
    assert set(plots((out / "report.html").read_text())) == set(PLOTS)
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
