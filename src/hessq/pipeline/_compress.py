"""``hessq.compress``: every stage in order, each artefact kept, progress shown per stage."""

from __future__ import annotations

import difflib
import glob
import inspect
import json
import os
import platform
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessq._checks import check_inputs, check_int, check_model, reiterable
from hessq._utils import batch_inputs, pad_token_id_of
from hessq._errors import ArtifactError, ConfigError, ConfigTypeError, HessqRuntimeError, InputDataError
from hessq._io import pid_alive, check_writable, write_text_atomic
from hessq.data import accuracy
from hessq.distill import DistilledData, distill_data
from hessq.graph import capture, quantizable_layers
from hessq.integer import IntegerModel, export_onnx, measure_latency_table, measure_onnx_latency, to_integer
from hessq.plan import (
    BitPlan,
    LatencyTable,
    ParetoFrontier,
    as_latency_table,
    evaluate_plan,
    lookup_counts,
    pareto_frontier,
    plan_bits,
)
from hessq.fakequant import finetune as run_finetune
from hessq.fakequant import quantize as fake_quantize
from hessq.report import render_report, results_table
from hessq.sensitivity import Sensitivity, hessian_sensitivity, kl_omega, kl_sensitivity
from hessq.pipeline._config import (
    CONFIG_ARGUMENTS,
    FLAT_OPTIONS,
    DistillConfig,
    ExportConfig,
    FinetuneConfig,
    PlanConfig,
    QuantizeConfig,
    SensitivityConfig,
)


@dataclass
class CompressResult:
    """Everything :func:`compress` made. ``rows`` are the evaluated settings (the report's table)."""

    sensitivity: Sensitivity
    plan: BitPlan
    frontier: ParetoFrontier | None
    qmodel: nn.Module
    imodel: IntegerModel
    rows: list[dict[str, Any]]
    latency_table: LatencyTable | None = None
    distilled: DistilledData | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)  # each stage's config, to_dict() (None: not used)

    @property
    def accuracy(self) -> float | None:
        """Top-1 of the compressed integer model on the evaluation data (None without it)."""
        return next((r.get("accuracy") for r in self.rows if r["name"] == "mixed"), None)

    def results(self) -> dict[str, Any]:
        """The JSON-ready summary written to results.json."""
        return {
            "format": "hessq.compress-results",
            "version": 1,
            "meta": self.meta,
            "configs": self.configs,
            "rows": self.rows,
            "plan": {"bits": dict(self.plan), "act_bits": self.plan.act_bits, **self.plan.totals(), "limits": self.plan.limits},
            "verification": self.verification,
            "timings_s": self.timings,
            "files": self.files,
        }

    def save(self, out_dir: str | os.PathLike, *, onnx_mode: str = "exact", report: bool = True,
             qat_checkpoint: str | os.PathLike | None = None) -> dict[str, str]:
        """Write sensitivity.json, plan.json, pareto.json, model.hq, model.onnx, results.json and report.html.

        Every file is written into a staging folder beside ``out_dir`` (``<out>.hessq-staging-<pid>``),
        which then replaces ``out_dir`` whole: an interrupted save leaves the old folder as it was,
        never half old, half new. Entries of the old folder that compress does not write (your own
        files) are kept. ``qat_checkpoint`` is copied in as ``qat.ckpt``.
        """
        out = check_out_dir(out_dir)
        files = {name: out / file for name, file in (
            ("sensitivity", "sensitivity.json"), ("plan", "plan.json"), ("integer_model", "model.hq"),
            ("onnx", "model.onnx"), ("results", "results.json"), ("results_table", "results.md"))}
        if self.frontier is not None:
            files["pareto"] = out / "pareto.json"
        if self.latency_table is not None:
            files["latency_table"] = out / "latency.json"
        if report:
            files["report"] = out / "report.html"
        if qat_checkpoint is not None:
            files["qat_checkpoint"] = out / "qat.ckpt"

        def write(folder: Path) -> None:
            at = {k: folder / v.name for k, v in files.items()}
            self.sensitivity.save(at["sensitivity"])
            self.plan.save(at["plan"])
            if self.frontier is not None:
                self.frontier.save(at["pareto"])
            if self.latency_table is not None:
                self.latency_table.save(at["latency_table"])
            self.imodel.save(at["integer_model"])
            narrow = _narrow_kernels(self.latency_table) if onnx_mode == "fast" else True  # exact: no kernels to choose
            export_onnx(self.imodel, at["onnx"], mode=onnx_mode, narrow_kernels=narrow)
            if qat_checkpoint is not None:
                _link_or_copy(Path(qat_checkpoint), at["qat_checkpoint"])
            self.files = {k: str(v) for k, v in files.items()}
            write_text_atomic(at["results"], json.dumps(self.results(), indent=2))
            write_text_atomic(at["results_table"],
                              f"# {self.meta.get('model', 'model')}: hessq compress\n\n"
                              f"{results_table(self.rows, metric=self.meta.get('metric', 'top-1'))}\n")
            if report:
                write_text_atomic(at["report"], self.report())

        publish(out, write)
        return self.files

    def report(self) -> str:
        """The self-contained HTML report."""
        v = self.verification
        notes = []
        if v:
            notes.append(f"The integer model was checked against the fake-quant model on {v.get('checked_inputs')} inputs: "
                         f"{'equal bit for bit' if v.get('bit_exact') else 'NOT equal'}. Accuracies are the integer model's.")
        if "latency" in self.meta:
            notes.append(f"Latency: {self.meta['latency']}.")
        return render_report(
            title=f"hessq compress: {self.meta.get('model', 'model')}",
            rows=self.rows, sensitivity=self.sensitivity, frontier=self.frontier, plan=self.plan,
            chosen="mixed", meta=self.meta, notes=notes, metric=self.meta.get("metric", "top-1"),
        )


# --- checks of every option, before the first stage ----------------------------------------

#: Files a compress run writes; any other entry of an old output folder is the user's and is kept.
ARTEFACT_NAMES = ("sensitivity.json", "plan.json", "pareto.json", "latency.json", "model.hq", "model.onnx",
                  "results.json", "results.md", "report.html", "qat.ckpt", "manifest.json")
_STAGING, _OLD = ".hessq-staging-", ".hessq-old-"
#: The W4A4 QAT checkpoint `hessq demo` keeps in its folder (the user's to keep, so not an artefact above).
DEMO_CHECKPOINT = "qat-w4a4.ckpt"


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as an absolute Path, or a :class:`ConfigError` when compress could not write it.

    The files are written into a staging folder beside it, so its parent must be writable too.
    """
    # abspath, not Path.absolute(): it folds '..', so '..' is recognised as the folder above.
    out = Path(os.path.abspath(out_dir))
    cwd, home = Path(os.path.abspath(Path.cwd())), Path(os.path.abspath(Path.home()))
    if out == cwd or out in cwd.parents or out == home or out == Path(out.anchor):
        # The folder is replaced whole at the end; renaming the working directory or home away is never wanted.
        what = "your home folder" if out == home else "the current folder or one above it"
        raise ConfigError(f"the output folder {out_dir} is {what}: compress replaces its output folder whole, "
                          f"so give it a folder of its own, e.g. {out / 'hessq-out'}")
    if not out.exists():
        check_writable(out, "the output folder")  # not under a file, in a writable folder
    elif not out.is_dir():
        raise ConfigError(f"the output folder {out_dir} is a file; give a folder (it is created when missing)")
    elif any(out.iterdir()) and not any((out / name).exists() for name in (*ARTEFACT_NAMES, DEMO_CHECKPOINT)):
        raise ConfigError(f"the output folder {out_dir} holds files but no hessq output: compress replaces its output "
                          f"folder whole, so give a new or empty folder, e.g. {out / 'hessq-out'}")
    elif not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"the output folder {out_dir} cannot be replaced: its parent {out.parent} is not writable "
                          "(compress writes a staging folder beside it and swaps it in at the end)")
    return out


def check_options(**options: Any) -> dict[str, Any]:
    """Every keyword option of :func:`compress`, checked; a :class:`ConfigError` naming the first bad one.

    Returns every option resolved: one config object per stage (``sensitivity`` may instead be a
    precomputed :class:`Sensitivity`, ``finetune`` is a :class:`FinetuneConfig` or None), ``out_dir``
    as an absolute Path. The old flat keywords (``size_limit=``, ``max_samples=``, ...) are folded into
    their configs with a :class:`DeprecationWarning` naming the new spelling. The command line calls
    this before loading anything, and :func:`compress` before its first stage.
    """
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS) - set(FLAT_OPTIONS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*_OPTION_DEFAULTS, *FLAT_OPTIONS], n=1)
        if close and close[0] in FLAT_OPTIONS:
            name, field = FLAT_OPTIONS[close[0]]
            close = [f"{name}={CONFIG_ARGUMENTS[name].__name__}({field}=...)"]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigTypeError(f"compress got unknown options {unknown}{hint}; its options are "
                              f"{', '.join(_OPTION_DEFAULTS)} (the stage settings go in the configs: "
                              f"{', '.join(f'{k}={c.__name__}(...)' for k, c in CONFIG_ARGUMENTS.items())})")
    o = {**_OPTION_DEFAULTS, **{k: v for k, v in options.items() if k in _OPTION_DEFAULTS}}
    flat = {k: v for k, v in options.items() if k in FLAT_OPTIONS}
    old_spellings = [f"{k}=" for k in flat]
    if isinstance(o["sensitivity"], str):  # the old sensitivity="hessian" | "kl"
        old_spellings.append(f"sensitivity={o['sensitivity']!r}")
        flat["sensitivity"] = o["sensitivity"]
        o["sensitivity"] = SensitivityConfig()
    if isinstance(o["finetune"], bool):  # the old finetune=True | False
        old_spellings.append(f"finetune={o['finetune']}")
        o["finetune"] = FinetuneConfig() if o["finetune"] else None
    for name, cls in CONFIG_ARGUMENTS.items():
        value = o[name]
        if (value is None and name == "finetune") or (name == "sensitivity" and isinstance(value, Sensitivity)):
            continue
        if not isinstance(value, cls):
            what = "a hessq.FinetuneConfig or None" if name == "finetune" else f"a hessq.{cls.__name__}"
            extra = " or a precomputed Sensitivity" if name == "sensitivity" else ""
            raise ConfigTypeError(f"{name} must be {what}{extra}, got {type(value).__name__}: build one with "
                                  f"hessq.{cls.__name__}(...) (or hessq.{cls.__name__}.from_dict(d) from a dict)")
    if flat:
        o.update(_fold_flat(o, flat))
    if old_spellings:
        warnings.warn(f"compress({', '.join(old_spellings)}) is deprecated and goes in the next release: "
                      f"write {_new_spelling(options)}", DeprecationWarning, stacklevel=3)
    shape = o["input_shape"]
    if shape is not None and (isinstance(shape, (str, bytes)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ConfigError(f"input_shape must be positive sizes without the batch dimension, e.g. (3, 32, 32), got {shape!r}")
    check_int(o["seed"], "seed", low=0)
    if o["out_dir"] is not None:
        o["out_dir"] = check_out_dir(o["out_dir"])
    return o


def _fold_flat(o: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """The configs with the old flat keywords applied on top; an error names the keyword as it was given."""
    changes: dict[str, dict[str, tuple[str, Any]]] = {}
    for old, value in flat.items():
        name, field = ("sensitivity", "method") if old == "sensitivity" else FLAT_OPTIONS[old]
        changes.setdefault(name, {})[field] = (old, value)
    out = {}
    for name, fields in changes.items():
        base = o[name]
        if isinstance(base, Sensitivity):
            raise ConfigError(f"{', '.join(f'{old}=' for old, _ in fields.values())} set how a sensitivity is computed, "
                              "but a precomputed Sensitivity was given: drop them")
        for field, (old, value) in fields.items():  # one by one, so an error names the keyword given
            try:
                base = base.replace(**{field: value})
            except ConfigError as exc:
                text = str(exc)
                raise type(exc)(text if old in text else f"{old}= ({text})") from None
        out[name] = base
    return out


def _new_spelling(options: Mapping[str, Any]) -> str:
    """The config form of the old flat keywords in ``options``, e.g. ``plan=PlanConfig(size_limit=...)``."""
    groups: dict[str, list[str]] = {}
    for old in options:
        if old in FLAT_OPTIONS:
            name, field = FLAT_OPTIONS[old]
            groups.setdefault(name, []).append(f"{field}=...")
    if isinstance(options.get("sensitivity"), str):
        groups.setdefault("sensitivity", []).insert(0, f"method={options['sensitivity']!r}")
    parts = [f"{name}={CONFIG_ARGUMENTS[name].__name__}({', '.join(fields)})" for name, fields in groups.items()]
    if isinstance(options.get("finetune"), bool):
        parts.append("finetune=FinetuneConfig()" if options["finetune"] else "finetune=None")
    return ", ".join(parts)


# --- the output folder: staged, then swapped in whole --------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s bytes: a hard link when the file system allows (a checkpoint may be large)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _writer_pid(path: Path, marker: str) -> int | None:
    tail = path.name.rsplit(marker, 1)[-1]
    return int(tail) if tail.isdigit() else None


def _keep_user_entries(old: Path, new: Path) -> None:
    """Move the entries of ``old`` that compress does not write (the user's own) into ``new``."""
    for entry in old.iterdir():
        if entry.name not in ARTEFACT_NAMES and not (new / entry.name).exists():
            os.rename(entry, new / entry.name)


def recover_out_dir(out: str | os.PathLike) -> list[Path]:
    """Tidy what runs killed outright (SIGKILL, power loss) left beside ``out``; returns the paths removed.

    A staging folder of a process that no longer runs is removed. An old output folder that was
    moved aside for the swap is put back when ``out`` is missing (the kill came between the two
    renames), else its user entries are kept and the rest removed.
    """
    out = Path(os.path.abspath(out))
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    pattern = glob.escape(str(out.parent / out.name))
    for marker in (_OLD, _STAGING):
        for path in sorted(Path(p) for p in glob.glob(f"{pattern}{marker}*")):
            pid = _writer_pid(path, marker)
            if pid is None or pid == os.getpid() or pid_alive(pid):
                continue  # another run is writing it (or it is no folder of ours)
            if marker == _OLD and not out.exists():
                os.rename(path, out)
                continue
            if marker == _OLD and out.is_dir():
                _keep_user_entries(path, out)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, so the renames of the swap are never split."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in pending:
            signal.raise_signal(s)


def publish(out: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` on a fresh staging folder beside ``out``, then make it ``out`` in one swap.

    On any error or interrupt the staging folder is removed and ``out`` is left as it was.
    """
    out = Path(os.path.abspath(out))
    recover_out_dir(out)
    staging = out.parent / f"{out.name}{_STAGING}{os.getpid()}"
    old = out.parent / f"{out.name}{_OLD}{os.getpid()}"
    if old.exists():  # left by an earlier save of this same process that could not finish tidying
        if out.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
        with _signals_deferred():
            if out.exists():
                os.rename(out, old)
            try:
                os.rename(staging, out)
            except BaseException:
                if old.exists() and not out.exists():
                    os.rename(old, out)
                raise
            if old.exists():
                _keep_user_entries(old, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


class _Stages:
    """Numbered stage headers with timings, so a long run says where it is."""

    def __init__(self, total: int, progress: bool) -> None:
        self.total, self.progress, self.index = total, progress, 0
        self.timings: dict[str, float] = {}
        self._name: str | None = None
        self._start = 0.0

    def __call__(self, name: str) -> None:
        self.done()
        self.index += 1
        self._name, self._start = name, time.perf_counter()
        if self.progress:
            print(f"[{self.index}/{self.total}] {name}", flush=True)

    def done(self) -> None:
        if self._name is not None:
            self.timings[self._name] = round(time.perf_counter() - self._start, 3)
            self._name = None


def _take(batches: Iterable, n: int) -> list:
    out = []
    for b in batches:
        if len(out) >= n:
            break
        out.append(b)
    return out


@torch.no_grad()
def _labelled(model: nn.Module, batches: Sequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) pairs; unlabelled batches take the FP32 model's own predictions as targets."""
    out = []
    for b in batches:
        if isinstance(b, (tuple, list)) and len(b) >= 2:
            out.append((b[0], b[1]))
        else:
            x = batch_inputs(b)
            out.append((x, model(x).argmax(1)))
    return out


def _input_shape(model: nn.Module, data: Any, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if data is not None:
        first = next(iter(data), None)
        if first is not None:
            return tuple(batch_inputs(first).shape[1:])
    known = getattr(model, "input_shape", None)
    if known is not None:
        return tuple(known)
    raise ConfigError(
        "without data hessq cannot tell the model's input shape: pass input_shape=(C, H, W) "
        "(on the command line: --input-shape C,H,W)"
    )


def _float_onnx_latency(model: nn.Module, shape: tuple[int, ...], batch_size: int, repeats: int, workdir: Path) -> float | None:
    """Median ONNX Runtime seconds of the FP32 model: the baseline every integer row is compared with."""
    import warnings

    path = workdir / "fp32.onnx"
    # an image model takes a float tensor, a text model (its first op a lookup) int64 token ids
    for example in (torch.zeros(1, *shape), torch.ones(1, *shape, dtype=torch.long)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                                  dynamo=False)
            return measure_onnx_latency(path, shape, batch_size=batch_size, repeats=repeats)
        except Exception:  # the FP32 baseline is context, never a reason to fail the run
            continue
    return None


def compress(
    model: nn.Module,
    data: Iterable | None,
    *,
    eval_data: Iterable | None = None,
    sensitivity: SensitivityConfig | Sensitivity = SensitivityConfig(),
    plan: PlanConfig = PlanConfig(),
    quantize: QuantizeConfig = QuantizeConfig(),
    distill: DistillConfig = DistillConfig(),
    finetune: FinetuneConfig | None = None,
    export: ExportConfig = ExportConfig(),
    input_shape: Sequence[int] | None = None,
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    seed: int = 0,
    progress: bool = True,
    metric: Callable[[nn.Module, Iterable], float] | None = None,
    metric_name: str = "top-1",
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    **deprecated: Any,
) -> CompressResult:
    """Compress ``model`` to mixed precision and an integer-only model, end to end.

    ``data``: an iterable of ``(inputs, targets)`` batches (or of input batches, labelled by the
    model's own predictions) used for the sensitivity (first ``sensitivity.batches``), calibration
    (first ``quantize.calibration_batches``) and QAT (all of it); ``None`` means data-free: ZeroQ
    distilled inputs (``distill``, a :class:`DistillConfig`) stand in for all three.
    ``eval_data`` (labelled batches) gives every row's top-1; without it accuracy is left empty.
    ``metric(model, eval_data)`` replaces top-1 by another score in [0, 1] (a detector's mAP), named
    ``metric_name`` in the results table and the report. ``loss_fn(output, targets)`` is the task's loss for the
    Hessian and QAT (default cross-entropy; a detector passes its detection loss, and ``FinetuneConfig(distill=False)``
    when its outputs are not class scores).
    Every stage reads the same batches: ``data`` or ``eval_data`` given as a one-shot iterator (a
    generator, ``iter(list)``) is read ONCE into a list that every stage reuses (so it must fit in
    memory); a re-iterable source such as a list or a ``DataLoader`` is used as it is, never listed.

    Each stage's settings are one config object (defaults: the config's own): ``sensitivity``
    (:class:`SensitivityConfig`, or a :class:`Sensitivity` you computed), ``plan``
    (:class:`PlanConfig`: bits, limits, Pareto points, latency), ``quantize`` (:class:`QuantizeConfig`:
    calibration, baselines), ``distill``, ``finetune`` (a :class:`FinetuneConfig` runs QAT; None: none)
    and ``export`` (:class:`ExportConfig`). Every option is checked before the first stage
    (:func:`check_options`): a bad value is a :class:`hessq.ConfigError` at once. The old flat
    keywords (``size_limit=``, ``max_samples=``, ``num_distilled=``, ...) still work for this release,
    with a :class:`DeprecationWarning` naming the config field each became.

    Stages: sensitivity → latency table (measured on ONNX Runtime when a latency limit needs one)
    → ILP plan under the limits (default: size at 50% between all-lowest and all-highest) plus a
    ``plan.pareto_points`` size–Ω frontier → quantize + calibrate → optional QAT →
    :func:`hessq.to_integer` → verification that the integer model equals the fake-quant model bit
    for bit → evaluation of FP32, the ``quantize.baselines`` (post-training) and the plan → with
    ``out_dir``, every file (see :meth:`CompressResult.save`), written into a staging folder that
    replaces ``out_dir`` whole at the end: an interrupted or failed run leaves the old folder as it was.
    ``results.json`` records every config's ``to_dict()`` under ``"configs"``.

    QAT with ``out_dir`` keeps its progress in ``<out_dir>.hessq-qat.ckpt`` beside the folder while it
    trains (moved into the folder as ``qat.ckpt`` at the end); a rerun with the same ``out_dir``
    resumes from it (or from the folder's ``qat.ckpt``), unless ``FinetuneConfig(resume=False)``.
    A checkpoint of other settings is refused with a :class:`hessq.CheckpointMismatchError`.
    ``meta["finetune_resumed"]`` says when a run resumed.
    """
    options = check_options(sensitivity=sensitivity, plan=plan, quantize=quantize, distill=distill, finetune=finetune,
                            export=export, input_shape=input_shape, out_dir=out_dir, model_name=model_name, seed=seed,
                            progress=progress, **deprecated)
    sensitivity, plan_cfg, quant_cfg, distill_cfg, ft, export_cfg, out = (
        options[k] for k in ("sensitivity", "plan", "quantize", "distill", "finetune", "export", "out_dir"))
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigTypeError(f"loss_fn must be a function (output, targets) -> loss, got {type(loss_fn).__name__}")
    if metric is not None and not callable(metric):
        raise ConfigTypeError(f"metric must be a function (model, eval_data) -> score in [0, 1], got {type(metric).__name__}")
    sens_cfg = sensitivity if isinstance(sensitivity, SensitivityConfig) else None
    weight_bits, act_bits, pin_first_last = plan_cfg.weight_bits, plan_cfg.act_bits, plan_cfg.pin_first_last
    measure_latency, latency_repeats = plan_cfg.measure_latency, plan_cfg.latency_repeats
    limits = plan_cfg.limits
    model = capture(check_model(model, "model")).eval()
    data = _reusable(data, "data")
    eval_data = _reusable(eval_data, "eval_data")
    if out is not None:
        recover_out_dir(out)
    torch.manual_seed(seed)
    stages = _Stages(total=6 + (data is None) + (ft is not None) + (out is not None), progress=progress)
    for source, what in ((data, "data"), (eval_data, "eval_data")):
        first = next(iter(source), None) if source is not None else None
        if first is not None:  # a wrong dtype or NaN is one clear error now, not one deep in a later stage
            check_inputs(batch_inputs(first, pad_token_id_of(model)), model, where=f"the inputs of {what}'s first batch")
    shape = _input_shape(model, data, input_shape)
    configs = {name: (None if options[name] is None or isinstance(options[name], Sensitivity) else options[name].to_dict())
               for name in CONFIG_ARGUMENTS}
    meta: dict[str, Any] = {
        "model": model_name or type(model).__name__,
        "metric": metric_name,
        "input_shape": list(shape),
        "data": "none (ZeroQ distilled)" if data is None else "given",
        "sensitivity": sens_cfg.method if sens_cfg is not None else "given (precomputed)",
        "limits": {k.removesuffix("_limit"): str(v) for k, v in limits.items()},
        "weight_bits": list(weight_bits),
        "act_bits": act_bits,
        "finetune": None if ft is None else configs["finetune"],
        "onnx_mode": export_cfg.onnx_mode,
        "latency": "ONNX Runtime median at batch 1: integer rows run the fast int8 export, FP32 the float export",
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }

    distilled = None
    if data is None:
        stages("distil inputs from the BatchNorm statistics (no data)")
        d = distill_cfg
        distilled = distill_data(model, d.num_samples, shape, steps=d.steps, lr=d.lr, batch_size=d.batch_size, seed=seed,
                                 progress=progress, input_range=d.input_range, label_weight=d.label_weight)
        meta["distilled_statistics_loss"] = distilled.loss
        train = distilled.labelled(model)
        if ft is not None:
            ft = ft.replace(distill=True)  # no labels: learn from the FP32 outputs only
    else:
        train = data
    # One read serves both, so a shuffled DataLoader gives the sensitivity and the calibration the same first batches.
    sensitivity_batches = sens_cfg.batches if sens_cfg is not None else 0
    calibration_batches = quant_cfg.calibration_batches
    first = _take(train, max(sensitivity_batches, calibration_batches))
    analysis = _labelled(model, first[:sensitivity_batches])
    calib = first[:calibration_batches]

    stages("sensitivity")
    omega = None
    if sens_cfg is None:
        sens = sensitivity
    elif sens_cfg.method == "kl":
        sens = kl_sensitivity(model, [batch_inputs(b) for b in calib], weight_bits=tuple(sorted(set(weight_bits) | {8})),
                              progress=progress)
        omega = kl_omega(sens)
    else:
        sens = hessian_sensitivity(model, analysis, rtol=sens_cfg.rtol, max_samples=sens_cfg.max_samples,
                                   min_samples=sens_cfg.min_samples, method=sens_cfg.estimator,
                                   time_budget=sens_cfg.time_budget, seed=seed, eigenvalues=False, progress=progress,
                                   loss_fn=loss_fn)

    stages("latency table (ONNX Runtime, per layer)")
    table = as_latency_table(plan_cfg.latency_table)
    if table is None and ("latency_limit" in limits or measure_latency):
        w8 = fake_quantize(model, (8, act_bits), calib, pin_first_last=pin_first_last)
        table = measure_latency_table(to_integer(w8), repeats=latency_repeats)

    stages("bit plan (ILP) and Pareto frontier")
    common = dict(weight_bits=weight_bits, act_bits=act_bits, pin_first_last=pin_first_last, input_shape=shape,
                  curvature=plan_cfg.curvature)
    tiers = {}
    if plan_cfg.row_tiers and data is not None and omega is None and any(
            isinstance(m, torch.nn.Embedding) for m in quantizable_layers(model).values()):
        tiers = dict(row_usage=lookup_counts(model, train), row_tiers=plan_cfg.row_tiers)
    plan = plan_bits(model, sens, latency_table=table, omega=omega, **limits, **common, **tiers)
    frontier = None
    if plan_cfg.pareto_points > 0 and omega is None:
        frontier = pareto_frontier(model, sens, num_points=plan_cfg.pareto_points, latency_table=table, **common,
                                   **tiers)
    if progress:
        print(f"      plan: average weight bits {plan.average_bits:.2f}, {plan.size_bytes / 1024:,.1f} KB", flush=True)

    stages("quantize and calibrate")
    qmodel = fake_quantize(model, plan, calib, pin_first_last=pin_first_last)

    ckpt = None
    if ft is not None:
        stages("quantization-aware training")
        ckpt = qat_checkpoint_path(out) if (out is not None and ft.checkpoint) else None
        resumed_from = _resume_source(ckpt, out) if (ckpt is not None and ft.resume) else None
        try:
            history = run_finetune(qmodel, train, teacher=model if ft.distill else None, epochs=ft.epochs, lr=ft.lr, optimizer=ft.optimizer,
                                   max_steps=ft.max_steps, checkpoint=ckpt, resume=ft.resume, seed=seed,
                                   progress=progress, loss_fn=loss_fn, track_ranges=ft.track_ranges,
                                   hidden_weight=ft.hidden_weight)
        except ArtifactError as exc:  # a damaged checkpoint, or one of other settings (CheckpointMismatchError)
            if resumed_from is not None and resumed_from != ckpt:
                ckpt.unlink(missing_ok=True)  # only a link to the folder's qat.ckpt: leave nothing behind
            source = resumed_from if resumed_from is not None else ckpt
            text = str(exc).replace(str(ckpt), str(source))
            cut = text.find(" Pass another checkpoint path")  # finetune's own remedy: compress has other ways out
            text = (text[:cut] if cut > 0 else text).rstrip(" .;")
            raise type(exc)(
                f"{text}. A rerun with the same output folder resumes QAT from {source}: use another output folder "
                f"(--out), delete {source}, or start over with FinetuneConfig(resume=False) (--no-resume)") from None
        meta["finetune_steps"] = history["steps"]
        if resumed_from is not None and history.get("resumed_from_step") is not None:
            meta["finetune_resumed"] = {"from_step": history["resumed_from_step"], "checkpoint": str(resumed_from)}

    stages("integer model and verification")
    imodel = to_integer(qmodel, input_shape=shape)
    check = _take(eval_data if eval_data is not None else train, 2)
    mismatched = 0
    with torch.no_grad():
        for b in check:
            x = batch_inputs(b)
            mismatched += int((imodel(x) != qmodel.eval()(x)).sum())
    verification = {"bit_exact": mismatched == 0, "checked_inputs": sum(len(batch_inputs(b)) for b in check)}
    if mismatched:
        raise HessqRuntimeError(
            f"the integer model differs from the fake-quant model in {mismatched} output elements; this is a bug in "
            "hessq, please report it with the model"
        )

    stages("evaluate FP32, uniform baselines and the plan")
    rows: list[dict[str, Any]] = []

    def add_row(name: str, bits: str, costs: BitPlan | None, imod: IntegerModel, **extra: Any) -> None:
        rows.append(evaluate_setting(name, bits, imod, eval_data, costs=costs, input_shape=shape,
                                     latency_repeats=latency_repeats if measure_latency else 0, progress=progress,
                                     metric=metric, narrow_kernels=_narrow_kernels(table), **extra))

    fp32_row: dict[str, Any] = {"name": "FP32", "bits": "32 / 32"}
    if eval_data is not None:
        fp32_row["accuracy"] = (metric(model, eval_data) if metric is not None
                                else accuracy(model, eval_data, progress=progress, desc="evaluate FP32"))
    fp32_costs = evaluate_plan(model, 8, act_bits=8, input_shape=shape)
    fp32_row["size_bytes"] = 4 * fp32_costs.num_params if fp32_costs.num_params else None
    fp32_row["bops"] = fp32_costs.bops * 16 if fp32_costs.bops is not None else None  # 32×32 instead of 8×8
    if measure_latency:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ms = _float_onnx_latency(model, shape, 1, latency_repeats, Path(tmp))
        fp32_row["latency_ms"] = None if ms is None else 1000 * ms
    rows.append(fp32_row)
    for wb, ab in quant_cfg.pairs(act_bits):
        name = f"W{wb}A{ab}"
        q = fake_quantize(model, (wb, ab), calib, pin_first_last=pin_first_last)
        costs = evaluate_plan(model, _uniform(plan, wb, pin_first_last), None if omega is not None else sens, act_bits=ab,
                              input_shape=shape)
        add_row(name, f"{wb} / {ab} (post-training)", costs, to_integer(q, input_shape=shape), omega=costs.omega)
    add_row("mixed", f"{'/'.join(map(str, sorted(set(plan.values()))))} / {act_bits} (plan"
            f"{', QAT' if ft is not None else ''})", plan, imodel, omega=plan.omega)
    stages.done()

    result = CompressResult(sensitivity=sens, plan=plan, frontier=frontier, qmodel=qmodel, imodel=imodel, rows=rows,
                            latency_table=table, distilled=distilled, verification=verification, timings=stages.timings,
                            meta=meta, configs=configs)
    if out is not None:
        stages("write files and report")
        result.save(out, onnx_mode=export_cfg.onnx_mode, report=export_cfg.report,
                    qat_checkpoint=ckpt if ckpt is not None and ckpt.exists() else None)
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)  # it now lives in the output folder as qat.ckpt
    return result


_OPTION_DEFAULTS = {name: p.default for name, p in inspect.signature(compress).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "eval_data"}


def _reusable(data: Iterable | None, what: str) -> Iterable | None:
    """``data`` when it can be read again; a one-shot iterator is read ONCE into a list every stage reuses."""
    if data is None:
        return None
    try:
        return reiterable(data, what=what)
    except InputDataError:
        if not isinstance(data, Iterable):
            raise
    batches = list(data)
    if not batches:
        raise InputDataError(f"{what} is an iterator that yields no batches (already exhausted?); pass a list of batches")
    return batches


def qat_checkpoint_path(out_dir: str | os.PathLike) -> Path:
    """Where QAT of a compress run into ``out_dir`` keeps its progress while it trains: beside the folder.

    Beside, not inside, so an interrupted run leaves the old output folder untouched and the next
    run with the same folder resumes from it. Once the run finishes it moves into the folder as qat.ckpt.
    """
    out = Path(os.path.abspath(out_dir))
    return out.parent / f"{out.name}.hessq-qat.ckpt"


def _resume_source(ckpt: Path, out: Path) -> Path | None:
    """The checkpoint QAT will resume from: an interrupted run's (beside ``out``) or a finished run's (in it)."""
    if ckpt.exists():
        return ckpt
    finished = out / "qat.ckpt"
    if finished.is_file():
        _link_or_copy(finished, ckpt)  # a link: finetune replaces the file by rename, never writes into it
        return finished
    return None


def evaluate_setting(
    name: str,
    bits: str,
    imodel: IntegerModel,
    eval_data: Iterable | None,
    *,
    costs: BitPlan | None = None,
    input_shape: Sequence[int] | None = None,
    latency_repeats: int = 30,
    progress: bool = False,
    metric: Callable[[nn.Module, Iterable], float] | None = None,
    narrow_kernels: bool | LatencyTable = True,
    **extra: Any,
) -> dict[str, Any]:
    """One row of the results table: the integer model's top-1, the plan's size/BOPs, its ONNX Runtime latency.

    The latency is the median at batch 1 of the "fast" ONNX export (ONNX Runtime's fused int8 kernels: the
    graph to deploy for speed; the bit-exact graph spends its time in float64 rounding arithmetic).
    ``latency_repeats=0`` skips it; ``narrow_kernels`` is :func:`hessq.export_onnx`'s; ``extra`` items are copied
    into the row.
    """
    import tempfile

    row: dict[str, Any] = {"name": name, "bits": bits, **extra}
    if eval_data is not None:
        row["accuracy"] = (metric(imodel, eval_data) if metric is not None
                           else accuracy(imodel, eval_data, progress=progress, desc=f"evaluate {name}"))
    if costs is not None:
        row.update(size_bytes=costs.size_bytes, bops=costs.bops, average_bits=costs.average_bits)
    if latency_repeats > 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(imodel, path, mode="fast", narrow_kernels=narrow_kernels)
            shape = tuple(input_shape) if input_shape is not None else imodel.input_shape
            row["latency_ms"] = 1000 * measure_onnx_latency(path, shape, batch_size=1, repeats=latency_repeats)
    return row


def _narrow_kernels(table: LatencyTable | None) -> bool | LatencyTable:
    """What the fast export runs on a width's own kernel (4-bit Linear: MatMulNBits): where ``table`` times it
    faster when the table has every width from 2 to 8 of every layer (as measure_latency_table writes it), else
    everywhere."""
    if table is not None and all(all(b in row for b in range(2, 9)) for row in table.values()):
        return table
    return True


def _uniform(plan: BitPlan, bits: int, first_last: int | None) -> dict[str, int]:
    names = list(plan)
    out = {n: bits for n in names}
    if first_last is not None and names:
        out[names[0]] = out[names[-1]] = first_last
    return out
