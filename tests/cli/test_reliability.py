"""The command line on bad input: one clear line, a non-zero exit, refused before any model runs; clean interrupts.

Every bad option below must be refused before a model computes anything: ``torch.nn.Module.__call__``
is replaced by a function that fails the test, so a check that comes after a forward pass (the
sensitivity, a calibration, a distillation) is caught.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hessq
from hessq.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, main

pytestmark = pytest.mark.filterwarnings("ignore:.*non-positive trace")

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "tests.pipeline._tiny:tiny_net"]


@pytest.fixture
def no_model_runs(monkeypatch):
    def forbidden(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} ran before the options were checked")

    monkeypatch.setattr(torch.nn.Module, "__call__", forbidden)


@pytest.fixture
def paths(tmp_path):
    """{file}: a regular file; {dir}: a folder; {missing}: no such path; {garbage}: a file of random bytes;
    {foreign}: another model's state_dict; {list}: a torch file that is no state_dict."""
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "garbage.pt").write_bytes(os.urandom(64))
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    torch.save([torch.zeros(2)], tmp_path / "a-list.pt")
    return {"file": str(tmp_path / "a-file"), "dir": str(tmp_path / "a-dir"), "missing": str(tmp_path / "missing.pt"),
            "garbage": str(tmp_path / "garbage.pt"), "foreign": str(tmp_path / "foreign.pt"),
            "list": str(tmp_path / "a-list.pt"), "out": str(tmp_path / "out")}


# (argv, words the one-line message must hold). {file}, {dir}, {missing}, {garbage}, {out}: see `paths`.
BAD = [
    # compress
    (["compress", *TINY, "--out", "{file}"], "is a file"),
    (["compress", *TINY, "--out", "{file}/sub"], "which is a file"),
    (["compress", *TINY, "--weight-bits", "4,16"], "--weight-bits"),
    (["compress", *TINY, "--weight-bits", ","], "--weight-bits is empty"),
    (["compress", *TINY, "--act-bits", "5"], "--act-bits"),
    (["compress", *TINY, "--baselines", "9"], "--baselines 9"),
    (["compress", *TINY, "--finetune-epochs", "-1"], "--finetune-epochs"),
    (["compress", *TINY, "--finetune-epochs", "nan"], "--finetune-epochs"),
    (["compress", *TINY, "--finetune-epochs", "1", "--finetune-steps", "0"], "--finetune-steps"),
    (["compress", *TINY, "--finetune-steps", "5"], "--finetune-steps needs --finetune-epochs"),
    (["compress", *TINY, "--finetune-epochs", "1", "--lr", "0"], "--lr"),
    (["compress", *TINY, "--pareto-points", "-4"], "--pareto-points"),
    (["compress", *TINY, "--size-limit", "abc"], "--size-limit"),
    (["compress", *TINY, "--size-limit=-5"], "--size-limit"),
    (["compress", *TINY, "--size-limit", "nan"], "--size-limit"),
    (["compress", *TINY, "--size-limit=-4%"], "--size-limit"),
    (["compress", *TINY, "--size-limit", "150%"], "--size-limit"),
    (["compress", *TINY, "--bops-limit", "0"], "--bops-limit"),
    (["compress", *TINY, "--latency-limit", "inf"], "--latency-limit"),
    (["compress", *TINY, "--calibration-batches", "0"], "--calibration-batches"),
    (["compress", *TINY, "--data", "none", "--input-shape", "1,8,8", "--distilled-samples", "0"], "--distilled-samples"),
    (["compress", *TINY, "--checkpoint", "{missing}"], "--checkpoint"),
    (["compress", *TINY, "--checkpoint", "{dir}"], "is a directory"),
    (["compress", *TINY, "--sensitivity", "{missing}"], "no such file"),
    (["compress", *TINY, "--pin-first-last", "9"], "--pin-first-last (None, or the bits of the first and last layer)"),
    (["compress", *TINY, "--pin-first-last", "4,8"], "--pin-first-last takes one bit width or 'none'"),
    (["compress", *TINY, "--max-samples", "0"], "--max-samples must be >= 1"),
    (["compress", *TINY, "--sensitivity-batches", "0"], "--sensitivity-batches must be >= 1"),
    (["compress", *TINY, "--rtol", "nan"], "--rtol"),
    (["compress", *TINY, "--latency-repeats", "0"], "--latency-repeats must be >= 1"),
    (["compress", *TINY, "--latency-table", "{missing}"], "--latency-table"),
    (["compress", *TINY, "--latency-table", "{garbage}"], "--latency-table"),
    (["compress", *TINY, "--seed", "-1"], "--seed must be >= 0"),
    # quantize
    (["quantize", "--plan", "{missing}"], "--plan"),
    (["quantize", "--plan", "{dir}"], "is a directory"),
    (["quantize", "--bits", "9"], "--bits 9"),
    (["quantize", "--bits", "abc"], "--bits must be comma-separated integers"),
    (["quantize", "-o", "{dir}"], "is a directory"),
    (["quantize", "-o", "{file}/m.hq"], "which is a file"),
    (["quantize", "--onnx", "{dir}"], "--onnx"),
    (["quantize", "--calibration-batches", "0"], "--calibration-batches"),
    (["quantize", "--checkpoint", "{missing}"], "--checkpoint"),
    (["quantize", "--checkpoint", "{garbage}"], "is not a readable hessq model checkpoint"),
    (["quantize", *TINY, "--checkpoint", "{foreign}"], "does not fit --model tests.pipeline._tiny:tiny_net"),
    (["quantize", *TINY, "--checkpoint", "{list}"], "holds a list, not a state_dict"),
    # analyze
    (["analyze", "--rtol", "-1"], "--rtol"),
    (["analyze", "--rtol", "nan"], "--rtol"),
    (["analyze", "--min-samples", "50", "--max-samples", "10"], "--min-samples 50 is more than --max-samples 10"),
    (["analyze", "--max-samples", "0"], "--max-samples"),
    (["analyze", "--top-k", "0"], "--top-k"),
    (["analyze", "--eig-tol", "0"], "--eig-tol"),
    (["analyze", "-o", "{dir}"], "is a directory"),
    (["analyze", "-o", "{file}/s.json"], "which is a file"),
    (["analyze", "--data", "none", "--distilled-samples", "0"], "--distilled-samples"),
    # plan
    (["plan", "{missing}"], "no such file"),
    (["plan", "{dir}"], "is a directory"),
    (["plan", "{file}", "-o", "{dir}"], "is a directory"),
    (["plan", "{file}", "--table", "{file}/t.md"], "--table"),
    (["plan", "{file}", "--latency-table", "{missing}"], "--latency-table"),
    # export
    (["export", "{missing}"], "no such file"),
    (["export", "{file}", "-o", "{dir}"], "is a directory"),
    (["export", "{file}", "--latency-table", "{dir}"], "--latency-table"),
    (["export", "{file}", "--repeats", "0"], "--repeats"),
    (["export", "{file}", "--batch-size", "0"], "--batch-size"),
    # distill
    (["distill", "-n", "0"], "--num-samples"),
    (["distill", "--steps", "0"], "--steps"),
    (["distill", "--lr", "nan"], "--lr"),
    (["distill", "--batch-size", "0"], "--batch-size"),
    (["distill", "--label-weight", "-1"], "--label-weight"),
    (["distill", "-o", "{dir}"], "is a directory"),
    (["distill", "--sensitivity", "{dir}"], "--sensitivity"),
    (["distill", "--input-range", "1,0"], "LOW < HIGH"),
    (["distill", "--sensitivity", "{out}.json", "--weight-bits", "4,16"], "--weight-bits"),
    # demo
    (["demo", "--out", "{file}"], "is a file"),
    (["demo", "--size-limit", "150%"], "--size-limit"),
    (["demo", "--qat-epochs", "0"], "--qat-epochs"),
    (["demo", "--test-limit", "0"], "--test-limit"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a[:1] + a[3:] if "--model" in a else a) for a, _ in BAD])
def test_a_bad_option_is_one_line_before_any_model_runs(argv, words, paths, no_model_runs, capsys):
    args = [a.format(**paths) for a in argv]
    assert main(args) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hessq {argv[0]}: error: "), captured.err
    assert words in lines[0]
    assert not Path(paths["out"]).exists()


def test_analyze_refuses_more_batches_than_the_data_holds(no_model_runs, tmp_path, capsys):
    # Fashion-MNIST's 60,000 training images are 235 batches of 256: asking for more is an error naming the maximum.
    assert main(["analyze", "--random-init", "--batches", "100000", "--no-progress", "-o", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("hessq analyze: error: --batches 100000: fashion-mnist/train has only 235 batches of 256; "
                   "give --batches 235 or fewer (or a smaller --batch-size)")


def test_plan_together_with_bits_is_refused(paths, capsys):
    # --bits 8 equals the old default, so it used to be silently ignored beside --plan.
    with pytest.raises(SystemExit) as stop:
        main(["quantize", "--plan", paths["file"], "--bits", "8"])
    assert stop.value.code == 2
    assert "--bits: not allowed with argument --plan" in capsys.readouterr().err


def _failing_export(monkeypatch, exc: BaseException) -> None:
    def run(args):
        raise exc

    monkeypatch.setattr("hessq.cli._export.run", run)


@pytest.mark.parametrize("exc, code, words", [
    (hessq.HessqError("any hessq error"), 1, "any hessq error"),
    (hessq.MissingDependencyError("pip install onnx"), 1, "pip install onnx"),
    (hessq.HessqRuntimeError("the loss became nan\nlower lr"), 1, "the loss became nan lower lr"),
    (PermissionError(13, "Permission denied", "/x/y"), 1, "Permission denied: /x/y"),
    (IsADirectoryError(21, "Is a directory", "/x"), 1, "Is a directory: /x"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "stopped by Ctrl-C (SIGINT)"),
])
def test_every_expected_failure_is_one_line_without_traceback(exc, code, words, monkeypatch, capsys):
    _failing_export(monkeypatch, exc)
    assert main(["export", "m.hq"]) == code
    err = capsys.readouterr().err
    assert err == f"hessq export: error: {words}\n"


def test_a_bug_keeps_its_traceback_and_debug_shows_every_one(monkeypatch, capsys):
    _failing_export(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        main(["export", "m.hq"])
    _failing_export(monkeypatch, hessq.ConfigError("bad"))
    for argv in (["--debug", "export", "m.hq"], ["export", "m.hq", "--debug"]):
        with pytest.raises(hessq.ConfigError):
            main(argv)


def test_sigterm_stops_the_command_with_143_and_restores_the_handler(monkeypatch, capsys):
    def run(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this sleep
        return 0

    monkeypatch.setattr("hessq.cli._export.run", run)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["export", "m.hq"]) == EXIT_TERMINATED == 143
    assert capsys.readouterr().err == "hessq export: error: stopped by SIGTERM\n"
    assert signal.getsignal(signal.SIGTERM) is before


# --- a real interrupt of `hessq compress` in a subprocess --------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_compress_leaves_the_old_folder_as_it_was(signum, code, tmp_path):
    from tests.pipeline._tiny import digits_data, tiny_net

    # A precomputed sensitivity, so the subprocess reaches QAT quickly.
    model = tiny_net().eval()
    sens = hessq.hessian_sensitivity(model, [next(iter(digits_data()[0]))], max_samples=2, min_samples=2,
                                     eigenvalues=False, progress=False)
    sens.save(tmp_path / "sens.json")
    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("plan.json", "old plan"), ("model.hq", "old model"), ("results.json", "{}"),
                       ("report.html", "<p>old</p>"), ("notes.txt", "mine")):
        (out / name).write_text(text)
    before = _snapshot(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hessq.cli", "compress", *TINY, "--data", "tests.pipeline._tiny:digits_data",
         "--sensitivity", str(tmp_path / "sens.json"), "--no-latency", "--pareto-points", "0", "--baselines", "none",
         "--calibration-batches", "1", "--finetune-epochs", "1000", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        # a suite started in the background (`make test &`) ignores SIGINT, and a child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in proc.stdout:  # wait until QAT (a stage after plan and calibration) has started
            if "quantization-aware training" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("hessq compress: error: stopped by"), err
    assert f"{out} is as it was" in errors[0]
    assert _snapshot(out) == before  # no file changed, none added
    assert sorted(p.name for p in tmp_path.iterdir() if "staging" in p.name or "old" in p.name) == []


def test_compress_says_when_it_resumes_and_how_to_get_past_a_foreign_checkpoint(tmp_path, capsys):
    from tests.pipeline._tiny import digits_data, tiny_net

    sens = hessq.hessian_sensitivity(tiny_net().eval(), [next(iter(digits_data()[0]))], max_samples=2, min_samples=2,
                                     eigenvalues=False, progress=False)
    sens.save(tmp_path / "sens.json")
    out = tmp_path / "out"
    argv = ["compress", *TINY, "--data", "tests.pipeline._tiny:digits_data", "--sensitivity", str(tmp_path / "sens.json"),
            "--no-latency", "--pareto-points", "0", "--baselines", "none", "--calibration-batches", "1",
            "--finetune-epochs", "1", "--finetune-steps", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "resumed QAT" not in capsys.readouterr().out
    assert main(argv) == 0  # the same run again: it resumes the finished checkpoint and says so
    assert f"resumed QAT from step 2 of 2, {out / 'qat.ckpt'}" in capsys.readouterr().out
    before = _snapshot(out)
    assert main([*argv, "--size-limit", "10%"]) == 1  # another plan: the checkpoint is refused, with the ways out
    err = capsys.readouterr().err.strip()
    assert err.startswith("hessq compress: error:") and len(err.splitlines()) == 1
    assert "another output folder (--out)" in err and f"delete {out / 'qat.ckpt'}" in err and "--no-resume" in err
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "sens.json"]
    assert main([*argv, "--size-limit", "10%", "--no-resume"]) == 0
    assert "resumed QAT" not in capsys.readouterr().out
