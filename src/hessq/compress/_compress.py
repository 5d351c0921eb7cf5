"""``hessq.compress``: every stage in order, each artefact kept, progress shown per stage."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessq._errors import ConfigError, ConfigTypeError, HessqRuntimeError
from hessq._io import write_text_atomic
from hessq.data import accuracy
from hessq.distill import DistilledData, distill_data
from hessq.integer import IntegerModel, export_onnx, measure_latency_table, measure_onnx_latency, to_integer

from hessq.plan import BitPlan, LatencyTable, ParetoFrontier, pareto_frontier, plan_bits
from hessq.plan._plan import evaluate_plan
from hessq.quantize import finetune as run_finetune
from hessq.quantize import quantize
from hessq.quantize._quantize import _inputs, check_finite
from hessq.report import render_report, results_table
from hessq.sensitivity import Sensitivity, hessian_sensitivity, kl_sensitivity
from hessq.sensitivity._kl import kl_omega


@dataclass
class FinetuneConfig:
    """Quantization-aware training after quantizing (see :func:`hessq.finetune`)."""

    epochs: float = 1  # fractional: a shorter whole cosine schedule
    lr: float = 0.01
    max_steps: int | None = None
    distill: bool = True  # learn from the FP32 model's outputs (the teacher)
    checkpoint: bool = True  # resumable checkpoint in the output folder


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
            "rows": self.rows,
            "plan": {"bits": dict(self.plan), "act_bits": self.plan.act_bits, **self.plan.totals(), "limits": self.plan.limits},
            "verification": self.verification,
            "timings_s": self.timings,
            "files": self.files,
        }

    def save(self, out_dir: str | os.PathLike, *, onnx_mode: str = "exact", report: bool = True) -> dict[str, str]:
        """Write sensitivity.json, plan.json, pareto.json, model.hq, model.onnx, results.json and report.html."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "sensitivity": out / "sensitivity.json",
            "plan": out / "plan.json",
            "integer_model": out / "model.hq",
            "onnx": out / "model.onnx",
            "results": out / "results.json",
            "results_table": out / "results.md",
        }
        self.sensitivity.save(files["sensitivity"])
        self.plan.save(files["plan"])
        if self.frontier is not None:
            files["pareto"] = out / "pareto.json"
            self.frontier.save(files["pareto"])
        if self.latency_table is not None:
            files["latency_table"] = out / "latency.json"
            self.latency_table.save(files["latency_table"])
        self.imodel.save(files["integer_model"])
        export_onnx(self.imodel, files["onnx"], mode=onnx_mode)
        if report:
            files["report"] = out / "report.html"
        self.files = {k: str(v) for k, v in files.items()}
        write_text_atomic(files["results"], json.dumps(self.results(), indent=2))
        write_text_atomic(out / "results.md", f"# {self.meta.get('model', 'model')}: hessq compress\n\n{results_table(self.rows)}\n")
        if report:
            write_text_atomic(files["report"], self.report())
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
            chosen="mixed", meta=self.meta, notes=notes,
        )


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
            x = _inputs(b)
            out.append((x, model(x).argmax(1)))
    return out


def _input_shape(model: nn.Module, data: Any, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if data is not None:
        first = next(iter(data), None)
        if first is not None:
            return tuple(_inputs(first).shape[1:])
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, torch.zeros(1, *shape), str(path), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)
    except Exception:  # the FP32 baseline is context, never a reason to fail the run
        return None
    return measure_onnx_latency(path, shape, batch_size=batch_size, repeats=repeats)


def compress(
    model: nn.Module,
    data: Iterable | None,
    *,
    size_limit: Any = None,
    bops_limit: Any = None,
    latency_limit: Any = None,
    weight_bits: Iterable[int] = (4, 8),
    act_bits: int = 8,
    finetune: bool | FinetuneConfig = False,
    eval_data: Iterable | None = None,
    sensitivity: str | Sensitivity = "hessian",
    sensitivity_batches: int = 1,
    calibration_batches: int = 8,
    max_samples: int = 100,
    rtol: float = 0.05,
    pin_first_last: int | None = 8,
    baselines: Sequence[int | tuple[int, int]] = (8, 4),
    pareto_points: int = 40,
    latency_table: LatencyTable | Mapping | str | os.PathLike | None = None,
    measure_latency: bool = True,
    latency_repeats: int = 30,
    num_distilled: int = 64,
    distill_steps: int = 500,
    distill_input_range: tuple[float, float] | None = None,
    distill_label_weight: float = 0.0,
    input_shape: Sequence[int] | None = None,
    out_dir: str | os.PathLike | None = None,
    onnx_mode: str = "exact",
    report: bool = True,
    model_name: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> CompressResult:
    """Compress ``model`` to mixed precision and an integer-only model, end to end.

    ``data``: an iterable of ``(inputs, targets)`` batches (or of input batches, labelled by the
    model's own predictions) used for the sensitivity (first ``sensitivity_batches``), calibration
    (first ``calibration_batches``) and QAT (all of it); ``None`` means data-free: ZeroQ distilled
    inputs stand in for all three (``num_distilled`` of them, ``distill_steps`` Adam steps, pixels kept
    in ``distill_input_range`` when given, ``distill_label_weight`` of cross-entropy to random classes).
    ``eval_data`` (labelled batches) gives every row's top-1; without it accuracy is left empty.

    Stages: sensitivity (``"hessian"``: Hutchinson traces; ``"kl"``: ZeroQ's KL; or a
    :class:`Sensitivity` you computed) → latency table (measured on ONNX Runtime when a latency
    limit needs one) → ILP plan under the limits (default: size at 50% between all-lowest and
    all-highest) plus a ``pareto_points`` size–Ω frontier → quantize + calibrate → optional QAT
    (``finetune=True`` or a :class:`FinetuneConfig`) → :func:`hessq.to_integer` → verification
    that the integer model equals the fake-quant model bit for bit → evaluation of FP32, the
    ``baselines`` (uniform weight bits, or (weight, act) pairs, post-training) and the plan →
    with ``out_dir``, every file (see :meth:`CompressResult.save`).
    """
    ft = FinetuneConfig() if finetune is True else (finetune or None)
    if ft is not None and not isinstance(ft, FinetuneConfig):
        raise ConfigTypeError(f"finetune must be a bool or a FinetuneConfig, got {type(finetune).__name__}")
    if isinstance(sensitivity, str) and sensitivity not in ("hessian", "kl"):
        raise ConfigError(f"sensitivity must be 'hessian', 'kl' or a Sensitivity, got {sensitivity!r}")
    if onnx_mode not in ("exact", "fast"):
        raise ConfigError(f"onnx_mode must be 'exact' or 'fast', got {onnx_mode!r}")
    if size_limit is None and bops_limit is None and latency_limit is None:
        size_limit = "50%"
    model = model.eval()
    check_finite(model)
    torch.manual_seed(seed)
    stages = _Stages(total=6 + (data is None) + (ft is not None) + (out_dir is not None), progress=progress)
    shape = _input_shape(model, data, input_shape)
    meta: dict[str, Any] = {
        "model": model_name or type(model).__name__,
        "input_shape": list(shape),
        "data": "none (ZeroQ distilled)" if data is None else "given",
        "limits": {k: str(v) for k, v in (("size", size_limit), ("bops", bops_limit), ("latency", latency_limit)) if v is not None},
        "weight_bits": list(weight_bits),
        "act_bits": act_bits,
        "finetune": None if ft is None else vars(ft),
        "onnx_mode": onnx_mode,
        "latency": "ONNX Runtime median at batch 1: integer rows run the fast int8 export, FP32 the float export",
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }

    distilled = None
    if data is None:
        stages("distil inputs from the BatchNorm statistics (no data)")
        distilled = distill_data(model, num_distilled, shape, steps=distill_steps, seed=seed, progress=progress,
                                 input_range=distill_input_range, label_weight=distill_label_weight)
        meta["distilled_statistics_loss"] = distilled.loss
        train = distilled.labelled(model)
        if ft is not None:
            ft = FinetuneConfig(**{**vars(ft), "distill": True})  # no labels: learn from the FP32 outputs only
    else:
        train = data
    analysis = _labelled(model, _take(train, sensitivity_batches))
    calib = _take(train, calibration_batches)

    stages("sensitivity")
    omega = None
    if isinstance(sensitivity, Sensitivity):
        sens = sensitivity
    elif sensitivity == "kl":
        sens = kl_sensitivity(model, [_inputs(b) for b in calib], weight_bits=tuple(sorted(set(weight_bits) | {8})),
                              progress=progress)
        omega = kl_omega(sens)
    else:
        sens = hessian_sensitivity(model, analysis, rtol=rtol, max_samples=max_samples, seed=seed, eigenvalues=False,
                                   progress=progress)

    stages("latency table (ONNX Runtime, per layer)")
    table = latency_table
    if table is None and (latency_limit is not None or measure_latency):
        w8 = quantize(model, (8, act_bits), calib, first_last_bits=pin_first_last)
        table = measure_latency_table(to_integer(w8), repeats=latency_repeats)

    stages("bit plan (ILP) and Pareto frontier")
    common = dict(weight_bits=weight_bits, act_bits=act_bits, pin_first_last=pin_first_last, input_shape=shape)
    plan = plan_bits(model, sens, size_limit=size_limit, bops_limit=bops_limit, latency_limit=latency_limit,
                     latency_table=table, omega=omega, **common)
    frontier = None
    if pareto_points > 0 and omega is None:
        frontier = pareto_frontier(model, sens, num_points=pareto_points, latency_table=table, **common)
    if progress:
        print(f"      plan: average weight bits {plan.average_bits:.2f}, {plan.size_bytes / 1024:,.1f} KB", flush=True)

    stages("quantize and calibrate")
    qmodel = quantize(model, plan, calib, first_last_bits=pin_first_last)

    if ft is not None:
        stages("quantization-aware training")
        ckpt = Path(out_dir) / "qat.ckpt" if (out_dir is not None and ft.checkpoint) else None
        history = run_finetune(qmodel, train, teacher=model if ft.distill else None, epochs=ft.epochs, lr=ft.lr,
                               max_steps=ft.max_steps, checkpoint=ckpt, seed=seed, progress=progress)
        meta["finetune_steps"] = history["steps"]

    stages("integer model and verification")
    imodel = to_integer(qmodel)
    check = _take(eval_data if eval_data is not None else train, 2)
    mismatched = 0
    with torch.no_grad():
        for b in check:
            x = _inputs(b)
            mismatched += int((imodel(x) != qmodel.eval()(x)).sum())
    verification = {"bit_exact": mismatched == 0, "checked_inputs": sum(len(_inputs(b)) for b in check)}
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
                                     **extra))

    fp32_row: dict[str, Any] = {"name": "FP32", "bits": "32 / 32"}
    if eval_data is not None:
        fp32_row["accuracy"] = accuracy(model, eval_data, progress=progress, desc="evaluate FP32")
    fp32_costs = evaluate_plan(model, 8, act_bits=8, input_shape=shape)
    fp32_row["size_bytes"] = 4 * fp32_costs.num_params if fp32_costs.num_params else None
    fp32_row["bops"] = fp32_costs.bops * 16 if fp32_costs.bops is not None else None  # 32×32 instead of 8×8
    if measure_latency:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ms = _float_onnx_latency(model, shape, 1, latency_repeats, Path(tmp))
        fp32_row["latency_ms"] = None if ms is None else 1000 * ms
    rows.append(fp32_row)
    for b in baselines:
        wb, ab = (b, act_bits) if isinstance(b, int) else b
        name = f"W{wb}A{ab}"
        q = quantize(model, (wb, ab), calib, first_last_bits=pin_first_last)
        costs = evaluate_plan(model, _uniform(plan, wb, pin_first_last), None if omega is not None else sens, act_bits=ab,
                              input_shape=shape)
        add_row(name, f"{wb} / {ab} (post-training)", costs, to_integer(q), omega=costs.omega)
    add_row("mixed", f"{'/'.join(map(str, sorted(set(plan.values()))))} / {act_bits} (plan"
            f"{', QAT' if ft is not None else ''})", plan, imodel, omega=plan.omega)
    stages.done()

    result = CompressResult(sensitivity=sens, plan=plan, frontier=frontier, qmodel=qmodel, imodel=imodel, rows=rows,
                            latency_table=table, distilled=distilled, verification=verification, timings=stages.timings,
                            meta=meta)
    if out_dir is not None:
        stages("write files and report")
        result.save(out_dir, onnx_mode=onnx_mode, report=report)
    return result


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
    **extra: Any,
) -> dict[str, Any]:
    """One row of the results table: the integer model's top-1, the plan's size/BOPs, its ONNX Runtime latency.

    The latency is the median at batch 1 of the "fast" ONNX export (ONNX Runtime's fused int8 kernels: the
    graph to deploy for speed; the bit-exact graph spends its time in float64 rounding arithmetic).
    ``latency_repeats=0`` skips it; ``extra`` items are copied into the row.
    """
    import tempfile

    row: dict[str, Any] = {"name": name, "bits": bits, **extra}
    if eval_data is not None:
        row["accuracy"] = accuracy(imodel, eval_data, progress=progress, desc=f"evaluate {name}")
    if costs is not None:
        row.update(size_bytes=costs.size_bytes, bops=costs.bops, average_bits=costs.average_bits)
    if latency_repeats > 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(imodel, path, mode="fast")
            shape = tuple(input_shape) if input_shape is not None else imodel.input_shape
            row["latency_ms"] = 1000 * measure_onnx_latency(path, shape, batch_size=1, repeats=latency_repeats)
    return row


def _uniform(plan: BitPlan, bits: int, first_last: int | None) -> dict[str, int]:
    names = list(plan)
    out = {n: bits for n in names}
    if first_last is not None and names:
        out[names[0]] = out[names[-1]] = first_last
    return out
