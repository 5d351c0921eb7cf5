"""What every bench script shares, taken from the package wherever hessq already has it.

- progress lines: :func:`log` (wall clock and seconds since the script started);
- result files: :func:`write_results` (JSON and Markdown, each written atomically by
  ``hessq._io.write_text_atomic``: an interrupted run never leaves half a file);
- machine facts: :func:`machine`, :func:`command_line`, :func:`git_commit`;
- top-1 agreement: :func:`predictions` and :func:`agreement` (scored by ``hessq.accuracy``
  against the reference model's predictions), :func:`same_top1` for two output arrays,
  :func:`fake_quant` to score a quantized model in float fake quantization;
- timing: :func:`ort_ms` (``hessq.integer.measure_onnx_latency``), :func:`median_ms` for an
  in-process callable (a PyTorch model, an ``IntegerModel``), :func:`ratio`;
- ONNX: :func:`export_fp32` (the FP32 baseline file), :func:`ort_session` and :func:`ort_outputs`;
- the bundled ResNet-20 checkpoint's SHA-256 and its cached Hessian traces.

Not a bench: ``make bench`` runs it as a script, which does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hessq
from hessq._io import write_text_atomic
from hessq.integer import measure_onnx_latency

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
T0 = time.time()


# ----------------------------------------------------------------------------- progress and files
def log(msg: str) -> None:
    """``[HH:MM:SS +seconds since start] msg``, flushed at once (bench runs are long and often piped)."""
    print(f"[{time.strftime('%H:%M:%S')} {time.time() - T0:+8.1f} s] {msg}", flush=True)


def write_results(json_path: str | os.PathLike, data: Mapping[str, Any], markdown: str | None = None,
                  md_path: str | os.PathLike | None = None, indent: int = 2) -> None:
    """``data`` as JSON at ``json_path`` and ``markdown`` beside it (``.md``, or ``md_path``), each atomically."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json_path, json.dumps(data, indent=indent))
    if markdown is not None:
        write_text_atomic(md_path if md_path is not None else json_path.with_suffix(".md"), markdown)


# ----------------------------------------------------------------------------- machine facts
def cpu_model() -> str:
    """The processor's name (``model name`` in /proc/cpuinfo), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> str:
    """One line: OS, architecture, CPU model, logical CPUs and the threads torch uses (or ``threads``).

    Float results of one seed differ in the last bits between processors (Xeon vs EPYC), so every
    result file names the CPU it was measured on.
    """
    threads = torch.get_num_threads() if threads is None else threads
    return f"{platform.platform()}, {platform.machine()}, {cpu_model()} ({os.cpu_count()} CPUs), {threads} threads"


def command_line() -> str:
    """How to rerun this script with the same arguments, from the repository root."""
    return " ".join([".venv/bin/python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def git_commit() -> str:
    """The short hash of the checked-out commit ('?' outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH)
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


# ----------------------------------------------------------------------------- agreement
@torch.no_grad()
def predictions(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Top-1 class of every input, on the CPU; ``model`` runs in eval mode on its own device."""
    from hessq._utils import model_device, training_mode

    device = model_device(model)
    with training_mode(model, False):
        return torch.cat([model(x[i : i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)])


def agreement(model, x: torch.Tensor, reference: torch.Tensor, batch: int = 32) -> float:
    """Fraction of inputs on which ``model``'s top-1 equals ``reference`` (another model's :func:`predictions`)."""
    return hessq.accuracy(model, [(x[i : i + batch], reference[i : i + batch]) for i in range(0, len(x), batch)])


def fake_quant(qmodel: torch.nn.Module) -> torch.nn.Module:
    """``qmodel`` evaluating in float fake quantization: faster on a CPU than its exact integer arithmetic."""
    if hasattr(qmodel, "integer_eval"):
        qmodel.integer_eval = False
    return qmodel


def same_top1(a, b) -> float:
    """Fraction of rows whose argmax agrees between two score arrays (NumPy or torch) of the same inputs."""
    return float((np.asarray(a).argmax(1) == np.asarray(b).argmax(1)).mean())


# ----------------------------------------------------------------------------- timing
def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (in-process code)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def interleaved_ms(runs: Mapping[str, Callable[[], Any]], repeats: int, seed: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each of ``runs``, one call of each per round in an order shuffled every round (from
    ``seed``): shared-machine noise hits all alike, and no run always follows the same one. Like against like:
    the callers give every run the same inputs and threads."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    order, rng = list(runs), random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            start = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def ort_ms(path: str | os.PathLike, input_shape: tuple[int, ...], batch: int, repeats: int, threads: int | None) -> float:
    """Median ONNX Runtime milliseconds of a whole exported model at ``batch``: hessq's own measurement."""
    return 1000 * measure_onnx_latency(path, tuple(input_shape), batch_size=batch, repeats=repeats, threads=threads)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; NaN when either is missing (NaN) or the denominator is 0."""
    if denominator == 0 or numerator != numerator or denominator != denominator:
        return float("nan")
    return numerator / denominator


# ----------------------------------------------------------------------------- ONNX
def export_fp32(model: torch.nn.Module, shape: tuple[int, ...], path: str | os.PathLike) -> None:
    """The FP32 model as ONNX (opset 17, input ``input``, dynamic batch): the baseline of every latency table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, *shape), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)


def ort_session(path: str | os.PathLike, threads: int | None, spinning: bool = False):
    """An ONNX Runtime CPU session of the file, on ``threads`` intra-op threads, every graph optimisation on.

    ``spinning`` is ONNX Runtime's ``session.intra_op.allow_spinning`` (its default: on). It is off here because
    the benches time several sessions in one process: an idle session's workers spin after each run and take cores
    from the session being timed. Even alone, on a 2-vCPU KVM guest (AMD EPYC), spinning made hessq's MiniLM W8A8
    batch-32 median range from 87 to 137 ms over three rotations (bench/ibert_pair.py, tweets); off, interleaved
    with two other sessions, it took 90-94 ms."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_outputs(session, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """The session's first output for every input, run ``batch`` inputs at a time."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch].numpy()})[0] for i in range(0, len(x), batch)])


# ----------------------------------------------------------------------------- the bundled checkpoint
def checkpoint_sha() -> str:
    """SHA-256 of the bundled ResNet-20 checkpoint: the key of cached results that belong to it."""
    ref = resources.files("hessq.models").joinpath("resnet20_fashion_mnist.pt")
    return hashlib.sha256(ref.read_bytes()).hexdigest()


def cached_sensitivity(path: str | os.PathLike, sha: str):
    """The :class:`hessq.Sensitivity` saved at ``path`` when it was computed for checkpoint ``sha``, else None.

    A cache this hessq cannot read (damaged, or written by an older file version) is a miss, said in the log.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        sens = hessq.Sensitivity.load(path)
    except hessq.ArtifactError as exc:
        log(f"sensitivity cache not used: {exc}")
        return None
    return sens if sens.meta.get("checkpoint_sha256") == sha else None
