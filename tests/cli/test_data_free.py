"""The data-free path on the command line: `hessq analyze/plan/quantize --data none` (ZeroQ distilled inputs)."""

from __future__ import annotations

import json

import pytest
import torch

import hessq
from hessq.cli import main
from hessq.distill import DistilledData
from hessq.sensitivity import Sensitivity, hessian_sensitivity

# Few distillation steps and samples: these tests check the plumbing, not the quality of the inputs.
FAST_DISTILL = ["--distilled-samples", "8", "--distill-steps", "5"]
FAST_HESSIAN = ["--max-samples", "2", "--min-samples", "2", "--no-eigenvalues", "--no-progress"]
USER_MODEL = "tests._models:TinyResNet"  # a BatchNorm model hessq knows nothing about


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_analyze_data_none_is_hessian_on_distilled_data(tmp_path, capsys):
    out = tmp_path / "sens.json"
    assert main(["analyze", "--data", "none", *FAST_DISTILL, *FAST_HESSIAN, "-o", str(out)]) == 0
    sens = Sensitivity.load(out)
    model = hessq.models.resnet20(pretrained=True)
    assert list(sens) == list(hessq.quantizable_layers(model))
    assert all(r.trace == r.trace and r.trace_stderr >= 0 for r in sens.values())  # no NaN: a real Hessian
    m = sens.meta
    assert m["data_free"] is True and m["dataset"] == "distilled" and m["targets"] == "fp32-argmax"
    assert m["num_data"] == 8 and m["distilled"]["steps"] == 5 and m["distilled"]["input_shape"] == [1, 28, 28]
    assert "distilled 8 inputs" in capsys.readouterr().out


def test_analyze_on_a_distilled_file_uses_fp32_predictions_as_targets(tmp_path):
    dist, out = tmp_path / "d.pt", tmp_path / "sens.json"
    assert main(["distill", "-n", "8", "--steps", "3", "--no-progress", "-o", str(dist)]) == 0
    assert main(["analyze", "--data", str(dist), "--batch-size", "4", "--seed", "1", *FAST_HESSIAN, "-o", str(out)]) == 0
    sens = Sensitivity.load(out)
    assert sens.meta["num_batches"] == 2 and sens.meta["distilled"]["source"] == str(dist)
    # The same figures as the Python API on the same inputs labelled by the model's own top-1.
    model = hessq.models.resnet20(pretrained=True)
    expected = hessian_sensitivity(model, DistilledData.load(dist).labelled(model, batch_size=4),
                                   max_samples=2, min_samples=2, eigenvalues=False, seed=1)
    for name in expected:
        assert sens[name].trace == pytest.approx(expected[name].trace, rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*non-positive trace")  # 2 Hutchinson samples: noisy traces
def test_plan_from_data_free_sensitivities(tmp_path, capsys):
    dist, kl, sens = tmp_path / "d.pt", tmp_path / "kl.json", tmp_path / "sens.json"
    assert main(["distill", "-n", "4", "--steps", "2", "--no-progress", "-o", str(dist),
                 "--sensitivity", str(kl), "--weight-bits", "4,8"]) == 0
    assert json.loads(kl.read_text())["meta"]["data_free"] is True
    # A KL sensitivity: the candidate widths default to the ones it holds KL for.
    assert main(["plan", str(kl), "--size-limit", "50%", "-o", str(tmp_path / "kl-plan.json")]) == 0
    plan = hessq.BitPlan.load(tmp_path / "kl-plan.json")
    assert set(plan.values()) <= {4, 8} and 4 in set(plan.values())
    assert main(["plan", str(kl), "--variant", "eigenvalue", "-o", str(tmp_path / "x.json")]) == 1
    assert "KL sensitivity" in capsys.readouterr().err
    # A Hessian sensitivity on the same distilled file.
    assert main(["analyze", "--data", str(dist), *FAST_HESSIAN, "-o", str(sens)]) == 0
    assert main(["plan", str(sens), "--size-limit", "50%", "-o", str(tmp_path / "plan.json")]) == 0
    plan = hessq.BitPlan.load(tmp_path / "plan.json")
    assert list(plan) == list(hessq.quantizable_layers(hessq.models.resnet20()))
    assert min(plan.values()) < 8  # the limit forced some layers below 8 bits


def test_quantize_data_none_gives_a_working_integer_model(tmp_path, capsys, fashion_test):
    out = tmp_path / "m.hq"
    assert main(["quantize", "--bits", "8", "--data", "none", "--distilled-samples", "16", "--distill-steps", "5",
                 "-o", str(out)]) == 0
    assert "distilled 16 inputs" in capsys.readouterr().out
    imodel = hessq.load_integer(out)
    assert imodel.meta["calibration"] == {"data": "distilled", "data_free": True, "num_samples": 16,
                                          "source": "distilled now"}
    x, y = next(iter(hessq.data.fashion_mnist("test", batch_size=300, limit=300)))
    fp32 = hessq.models.resnet20(pretrained=True)
    with torch.no_grad():
        acc_fp32 = (fp32(x).argmax(1) == y).float().mean().item()
        acc_int = (imodel(x).argmax(1) == y).float().mean().item()
    assert acc_int > 0.85 and acc_int > acc_fp32 - 0.03, (acc_int, acc_fp32)


def test_quantize_on_a_distilled_file_and_shape_mismatch(tmp_path, capsys):
    dist = tmp_path / "d.pt"
    DistilledData(torch.randn(4, 3, 8, 8), loss=0.0, initial_loss=0.0, batch_losses=[0.0], steps=0, lr=0.5,
                  batch_size=4, seed=0, seconds=0.0, num_bn_layers=1).save(dist)
    assert main(["quantize", "--data", str(dist), "-o", str(tmp_path / "m.hq")]) == 1
    assert "holds inputs of shape (3, 8, 8), but --model resnet20 takes (1, 28, 28)" in capsys.readouterr().err
    assert main(["quantize", "--data", str(tmp_path / "absent.pt"), "-o", str(tmp_path / "m.hq")]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["analyze", *FAST_HESSIAN],
    ["quantize", "--bits", "8"],
])
def test_user_model_needs_input_shape(tmp_path, capsys, command):
    out = tmp_path / "out"
    args = [*command, "--model", USER_MODEL, "--data", "none", *FAST_DISTILL, "-o", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--input-shape is needed for --model tests._models:TinyResNet" in err and not out.exists()
    # With the shape given, the same command runs.
    assert main([*args, "--input-shape", "1,8,8"]) == 0
    assert out.exists()


def test_distill_user_model_needs_input_shape(tmp_path, capsys):
    assert main(["distill", "--model", USER_MODEL, "--steps", "1", "--no-progress", "-o", str(tmp_path / "d.pt")]) == 1
    assert "--input-shape is needed" in capsys.readouterr().err


def test_analyze_random_init_still_works(tmp_path):
    dist = tmp_path / "d.pt"
    assert main(["distill", "-n", "4", "--steps", "1", "--no-progress", "-o", str(dist)]) == 0
    traces = []
    for i, flags in enumerate([["--random-init"], ["--random-init"], []]):
        out = tmp_path / f"s{i}.json"
        assert main(["analyze", *flags, "--data", str(dist), *FAST_HESSIAN, "-o", str(out)]) == 0
        traces.append([r.trace for r in Sensitivity.load(out).values()])
    assert traces[0] == traces[1]  # seeded: the same random weights every run (and on every rank)
    assert traces[0] != traces[2]  # and not the trained weights


def test_a_damaged_distilled_file_is_refused_in_one_line(tmp_path, capsys):
    dist = tmp_path / "d.pt"
    assert main(["distill", "-n", "4", "--steps", "1", "--no-progress", "-o", str(dist)]) == 0
    raw = bytearray(dist.read_bytes())
    pixels = DistilledData.load(dist).inputs.numpy().tobytes()
    start = bytes(raw).find(pixels)
    assert start > 0
    raw[start + len(pixels) // 2] ^= 0x10  # one pixel changed: the file still unpickles, only its checksum tells
    dist.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["quantize", "--bits", "8", "--data", str(dist), "-o", str(tmp_path / "m.hq")]) == 1
    err = capsys.readouterr().err
    assert f"{dist} is damaged or was edited" in err and "Traceback" not in err, err
    assert not (tmp_path / "m.hq").exists()
