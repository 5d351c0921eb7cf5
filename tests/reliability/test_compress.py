"""hessq.compress on bad input and interruptions: options checked before the first stage, the same
batches for every stage, and an output folder that is never half old, half new."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hessq
from hessq.pipeline import _compress as C
from tests.pipeline._tiny import digits_data, tiny_net

pytestmark = pytest.mark.filterwarnings("ignore:.*non-positive trace")

FAST = dict(plan=hessq.PlanConfig(measure_latency=False, pareto_points=0), quantize=hessq.QuantizeConfig(baselines=(),
            calibration_batches=2), sensitivity=hessq.SensitivityConfig(max_samples=3), progress=False)


@pytest.fixture
def no_stage_runs(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a stage ran before the options were checked")

    for stage in ("hessian_sensitivity", "kl_sensitivity", "distill_data", "fake_quantize", "plan_bits", "run_finetune"):
        monkeypatch.setattr(C, stage, forbidden)


def _batches(n: int = 2) -> list:
    train = iter(digits_data()[0])
    return [next(train) for _ in range(n)]


# Each: (config class, fields) that must be refused with a ConfigError naming Class.field when the config is made.
BAD_CONFIGS = [
    (hessq.PlanConfig, dict(size_limit="abc")), (hessq.PlanConfig, dict(size_limit=-5)), (hessq.PlanConfig, dict(size_limit=0)),
    (hessq.PlanConfig, dict(size_limit=math.nan)), (hessq.PlanConfig, dict(size_limit="150%")),
    (hessq.PlanConfig, dict(size_limit="-4%")), (hessq.PlanConfig, dict(bops_limit=math.inf)),
    (hessq.PlanConfig, dict(latency_limit="nan%")), (hessq.PlanConfig, dict(size_limit=True)),
    (hessq.PlanConfig, dict(weight_bits=(4, 16))), (hessq.PlanConfig, dict(weight_bits=())),
    (hessq.PlanConfig, dict(weight_bits=(4.5, 8))), (hessq.PlanConfig, dict(weight_bits="48")),
    (hessq.PlanConfig, dict(act_bits=5)), (hessq.PlanConfig, dict(pareto_points=-4)), (hessq.PlanConfig, dict(pareto_points=2.5)),
    (hessq.PlanConfig, dict(pin_first_last=9)), (hessq.PlanConfig, dict(latency_repeats=0)),
    (hessq.PlanConfig, dict(measure_latency="yes")), (hessq.PlanConfig, dict(latency_table="{file}")),
    (hessq.QuantizeConfig, dict(baselines=(9,))), (hessq.QuantizeConfig, dict(baselines=((4, 5),))),
    (hessq.QuantizeConfig, dict(baselines=((4, 8, 8),))), (hessq.QuantizeConfig, dict(baselines=3)),
    (hessq.QuantizeConfig, dict(calibration_batches=0)),
    (hessq.SensitivityConfig, dict(method="fisher")), (hessq.SensitivityConfig, dict(batches=0)),
    (hessq.SensitivityConfig, dict(max_samples=0)), (hessq.SensitivityConfig, dict(rtol=-1.0)),
    (hessq.SensitivityConfig, dict(rtol=math.nan)), (hessq.SensitivityConfig, dict(min_samples=300)),
    (hessq.DistillConfig, dict(num_samples=0)), (hessq.DistillConfig, dict(steps=-1)),
    (hessq.DistillConfig, dict(label_weight=-1.0)), (hessq.DistillConfig, dict(input_range=(1.0, 0.0))),
    (hessq.DistillConfig, dict(lr=0)),
    (hessq.FinetuneConfig, dict(epochs=-1)), (hessq.FinetuneConfig, dict(epochs=math.nan)), (hessq.FinetuneConfig, dict(lr=0)),
    (hessq.FinetuneConfig, dict(max_steps=0)), (hessq.FinetuneConfig, dict(resume="yes")),
    (hessq.ExportConfig, dict(onnx_mode="turbo")), (hessq.ExportConfig, dict(report=1)),
]


@pytest.mark.parametrize("cls, fields", BAD_CONFIGS, ids=[f"{c.__name__}{f!r}" for c, f in BAD_CONFIGS])
def test_a_bad_config_value_is_refused_naming_the_field(cls, fields, tmp_path):
    (tmp_path / "a-file").write_text("not a latency table")
    fields = {k: v.format(file=tmp_path / "a-file") if isinstance(v, str) and "{" in v else v for k, v in fields.items()}
    error = hessq.ArtifactError if "latency_table" in fields else hessq.ConfigError  # a file that is no latency table
    with pytest.raises(error) as err:
        cls(**fields)
    assert f"{cls.__name__}.{next(iter(fields))}" in str(err.value)


# Each: keyword options of compress that must be refused with a ConfigError before any stage: the stage
# options themselves, and the old flat keywords (deprecated), which are checked by the same configs.
BAD_OPTIONS = [
    dict(seed=-1), dict(input_shape=(0, 8, 8)), dict(input_shape="1,8,8"), dict(out_dir="{file}"), dict(out_dir="{file}/sub"),
    dict(plan=dict(size_limit="50%")), dict(sensitivity="fisher"), dict(finetune=3), dict(export="fast"),
    dict(size_limit="abc"), dict(size_limit=math.nan), dict(weight_bits=(4, 16)), dict(act_bits=5), dict(baselines=(9,)),
    dict(pareto_points=-4), dict(sensitivity_batches=0), dict(calibration_batches=0), dict(max_samples=0), dict(rtol=-1.0),
    dict(pin_first_last=9), dict(latency_repeats=0), dict(num_distilled=0), dict(distill_steps=-1),
    dict(distill_label_weight=-1.0), dict(distill_input_range=(1.0, 0.0)), dict(onnx_mode="turbo"),
    dict(size_limt="50%"),
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=[repr(o) for o in BAD_OPTIONS])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_bad_option_is_refused_before_the_first_stage(options, no_stage_runs, tmp_path):
    (tmp_path / "a-file").write_text("x")
    options = {k: v.format(file=tmp_path / "a-file") if isinstance(v, str) and "{" in v else v for k, v in options.items()}
    with pytest.raises(hessq.ConfigError) as err:
        hessq.compress(tiny_net(), _batches(1), **options, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "a-file"]  # nothing written
    name = next(iter(options))
    assert name.split("_")[0] in str(err.value)  # the message names the option


@pytest.mark.parametrize("model, data, error", [
    ("a string", [], hessq.ConfigTypeError),
    (torch.nn.Linear(2, 2).to("meta"), [], hessq.ModelError),
    ("nan", [], hessq.ModelError),
    (None, 5, hessq.InputDataError),
    (None, iter([]), hessq.InputDataError),
    (None, [torch.zeros(1, 1, 8, 8, dtype=torch.uint8)], hessq.InputDataError),
], ids=["not-a-module", "meta", "nan-weights", "not-iterable", "empty-iterator", "uint8-inputs"])
def test_a_bad_model_or_data_is_refused_before_the_first_stage(model, data, error, monkeypatch):
    if data and isinstance(data, list):  # inputs are checked as the stage that reads them starts
        monkeypatch.setattr(C, "hessian_sensitivity", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    if model is None or model == "nan":
        net = tiny_net()
        if model == "nan":
            with torch.no_grad():
                net.conv1.weight[0, 0, 0, 0] = math.nan
        model = net
    with pytest.raises(error):
        hessq.compress(model, data, **FAST)


QAT = hessq.FinetuneConfig(epochs=1, max_steps=2)


@pytest.fixture(scope="module")
def result():
    """compress on a list of 2 batches, with 2 QAT steps."""
    return hessq.compress(tiny_net().eval(), _batches(2), finetune=QAT, **FAST)


def test_a_one_shot_iterator_is_read_once_and_gives_the_same_plan(result, tmp_path):
    batches = _batches(2)  # with 2 batches a one-shot iterator used to leave calibration none at all
    listed = result
    once = hessq.compress(tiny_net().eval(), iter(batches), finetune=QAT, out_dir=tmp_path / "out", **FAST)
    assert dict(once.plan) == dict(listed.plan)
    assert {n: r.trace for n, r in once.sensitivity.items()} == {n: r.trace for n, r in listed.sensitivity.items()}
    x = batches[0][0]
    assert torch.equal(once.imodel(x), listed.imodel(x))  # calibration and QAT saw the same batches too
    # The QAT checkpoint ends in the folder; nothing is left beside it.
    assert (tmp_path / "out" / "qat.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_reiterable_loader_is_not_listed():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8)), batch_size=2)
    assert C._reusable(loader, "data") is loader
    assert C._reusable(iter([1, 2]), "data") == [1, 2]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _old_folder(out: Path) -> dict[str, bytes]:
    out.mkdir()
    for name, text in (("plan.json", "old plan"), ("model.hq", "old model"), ("results.json", "{}"),
                       ("pareto.json", "old frontier"), ("notes.txt", "mine")):
        (out / name).write_text(text)
    return _snapshot(out)


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError])
def test_an_interrupted_save_leaves_the_old_folder_as_it_was(fault, result, tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = _old_folder(out)

    def fail(*args, **kwargs):  # after sensitivity.json and plan.json were written
        raise fault("stopped while writing")

    monkeypatch.setattr(C, "export_onnx", fail)
    with pytest.raises(fault):
        result.save(out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging folder is gone


def test_a_save_replaces_every_artefact_and_keeps_the_users_files(result, tmp_path):
    out = tmp_path / "out"
    _old_folder(out)
    files = result.save(out)
    names = {p.name for p in out.iterdir()}
    assert names == {Path(f).name for f in files.values()} | {"notes.txt"}
    assert "pareto.json" not in names  # the old run's frontier is not left beside this run's plan
    assert (out / "notes.txt").read_text() == "mine"
    assert hessq.BitPlan.load(out / "plan.json") == result.plan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_what_a_killed_run_left_is_tidied_by_the_next(result, tmp_path):
    out = tmp_path / "out"
    pid = _dead_pid()
    # A kill between the two renames of a swap: the old folder lies aside, out is missing.
    aside = tmp_path / f"out.hessq-old-{pid}"
    before = _old_folder(aside)
    stale = tmp_path / f"out.hessq-staging-{pid}"
    stale.mkdir()
    (stale / "plan.json").write_text("half written")
    C.recover_out_dir(out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A kill after the swap: the old folder is aside beside the new one; its user files are kept.
    result.save(out)
    aside.mkdir()
    (aside / "mine.txt").write_text("kept")
    (aside / "plan.json").write_text("old")
    result.save(out)
    assert (out / "mine.txt").read_text() == "kept" and (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_foreign_qat_checkpoint_names_the_ways_out(tmp_path):
    # A checkpoint in the output folder that is not a QAT checkpoint of this run: refused, saying what to do.
    out = tmp_path / "out"
    out.mkdir()
    (out / "qat.ckpt").write_bytes(os.urandom(256))
    with pytest.raises(hessq.HessqError) as err:
        hessq.compress(tiny_net().eval(), _batches(2), finetune=hessq.FinetuneConfig(max_steps=1), out_dir=out, **FAST)
    message = str(err.value)
    assert str(out / "qat.ckpt") in message and "--no-resume" in message and "another output folder" in message
    assert not C.qat_checkpoint_path(out).exists()  # nothing left beside the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("out", [".", "..", "../..", "home", "a folder of the user's"])
def test_a_folder_compress_must_not_replace_is_refused_before_any_stage(tmp_path, monkeypatch, out):
    # The folder is swapped in whole at the end: the working folder, one above it, home or a folder
    # of other files would be renamed away (found by hand: `--out ..` once ran up to the swap).
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("kept")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    target = {"home": str(tmp_path / "a"), "a folder of the user's": str(work)}.get(out, out)
    if out == "a folder of the user's":
        monkeypatch.chdir(tmp_path)
    with pytest.raises(hessq.ConfigError, match="compress replaces its output folder whole"):
        C.check_out_dir(target)
    assert (work / "mine.txt").read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
