"""``hessq compress``: the whole pipeline from the command line, every artefact written to one folder."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hessq._checks import check_number
from hessq._errors import ArtifactError, ConfigError
from hessq.cli._common import (
    BUNDLED_INPUT_RANGES,
    add_config_flag,
    add_model_arguments,
    check_readable,
    load_model,
    parse_input_shape,
    parse_ints,
)
from hessq.cli._tasks import TASK_MODELS, TEXT_DATA, check_hf_spec, hf_model, is_hf_spec, load_task
from hessq.pipeline import CONFIG_ARGUMENTS, SensitivityConfig
from hessq.plan import CURVATURES
from hessq.sensitivity import TRACE_METHODS


#: (flag, compress's config keyword, field, argparse options): the flags that set a config field. Their
#: defaults are the config's own (:func:`add_config_flag`); a flag given as text is parsed by _PARSE.
CONFIG_FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--size-limit", "plan", "size_limit", dict(help="bytes, or a percentage between all-lowest and all-highest like "
                                                    "50%%; with no limit given, the size is held to 50%%")),
    ("--bops-limit", "plan", "bops_limit", dict(help="bit operations, or a percentage")),
    ("--latency-limit", "plan", "latency_limit",
     dict(help="seconds, or a percentage (the latency table is measured on ONNX Runtime)")),
    ("--weight-bits", "plan", "weight_bits", dict(help="candidate weight bit widths")),
    ("--act-bits", "plan", "act_bits", dict(type=int, help="activation bits")),
    ("--pin-first-last", "plan", "pin_first_last", dict(help="bits of the first and last layer, or 'none'")),
    ("--pareto-points", "plan", "pareto_points", dict(type=int, help="size limits on the Pareto frontier (0 = none)")),
    ("--latency-table", "plan", "latency_table", dict(help="a latency.json (`hessq export --latency-table`) to plan with")),
    ("--no-latency", "plan", "measure_latency", dict(action="store_false", help="skip the ONNX Runtime latency measurements")),
    ("--latency-repeats", "plan", "latency_repeats", dict(type=int, help="timed runs per latency measurement")),
    ("--row-tiers", "plan", "row_tiers", dict(type=int, help="plan each embedding table's rows in this many tiers "
                                                             "by their lookups in the data (0: one width per table)")),
    ("--curvature", "plan", "curvature", dict(choices=CURVATURES, help="how a negative Hessian trace enters the plan: "
                                              "signed (HAWQ: least sensitive) or magnitude (|trace|, as Q-BERT's |λ|)")),
    ("--sensitivity-batches", "sensitivity", "batches", dict(type=int, help="data batches the Hessian reads")),
    ("--max-samples", "sensitivity", "max_samples", dict(type=int, help="at most this many Hutchinson samples")),
    ("--rtol", "sensitivity", "rtol", dict(type=float, help="stop when every layer's trace stderr <= rtol*|trace|")),
    ("--trace-method", "sensitivity", "estimator",
     dict(choices=TRACE_METHODS, help="how each Hessian trace is computed (auto: exact Gauss-Newton where the model allows)")),
    ("--time-budget", "sensitivity", "time_budget", dict(type=float, help="stop Hessian sampling after this many seconds")),
    ("--calibration-batches", "quantize", "calibration_batches", dict(type=int, help="batches used to set the ranges")),
    ("--baselines", "quantize", "baselines", dict(help="uniform weight widths evaluated for comparison ('none': no baselines)")),
    ("--distilled-samples", "distill", "num_samples", dict(type=int, help="distilled inputs with --data none")),
    ("--distill-steps", "distill", "steps", dict(type=int, help="Adam steps of distillation")),
    ("--distill-label-weight", "distill", "label_weight",
     dict(type=float, help="with --data none: weight of cross-entropy to random classes in the distillation (0 = plain ZeroQ)")),
    ("--finetune-steps", "finetune", "max_steps", dict(type=int, help="stop QAT after this many steps")),
    ("--lr", "finetune", "lr", dict(type=float, help="QAT learning rate")),
    ("--qat-optimizer", "finetune", "optimizer", dict(choices=("sgd", "adamw"),
                                                      help="sgd (with momentum; CNNs) or adamw (transformers)")),
    ("--no-range-tracking", "finetune", "track_ranges",
     dict(action="store_false", help="keep the calibrated activation ranges in QAT (default: follow each batch)")),
    ("--hidden-weight", "finetune", "hidden_weight",
     dict(type=float, help="weight of hidden-state distillation in QAT (every LayerNorm's output; 0: logits only)")),
    ("--no-resume", "finetune", "resume", dict(action="store_false",
                                               help="start QAT over even when the output folder holds a checkpoint of an earlier run")),
    ("--onnx-mode", "export", "onnx_mode", dict(choices=("exact", "fast"),
                                                help="exact: bit-exact integer graph; fast: fused QLinearConv kernels")),
    ("--no-report", "export", "report", dict(action="store_false", help="do not write report.html")),
]


def _dest(name: str, field: str) -> str:
    return f"{name}_{field}"


def _bits_or_none(text: str, flag: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    bits = parse_ints(text, flag)
    if len(bits) != 1:
        raise ConfigError(f"{flag} takes one bit width or 'none', got {text!r}")
    return bits[0]


#: How a flag given as text becomes the field's value (a flag not given keeps the config's default as it is).
_PARSE: dict[str, Callable[[str, str], Any]] = {
    "weight_bits": parse_ints,
    "pin_first_last": _bits_or_none,
    "baselines": lambda text, flag: [] if text.strip().lower() == "none" else parse_ints(text, flag),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="sensitivity → plan → quantize → (QAT) → integer model → verify → ONNX → report.html, in one folder",
    )
    add_model_arguments(p)
    p.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist', 'none' (data-free: ZeroQ distilled inputs), 'bbc' or 'tweets' (text, for "
                        "--model hf:...), or 'package.module:function' returning (inputs, targets) batches (or dicts "
                        "with labels), a (train, eval) pair, or a dict with 'train' and 'eval'")
    p.add_argument("--sensitivity", default=SensitivityConfig.defaults()["method"],
                   help="'hessian' (Hutchinson traces), 'kl' (ZeroQ) or a sensitivity.json from `hessq analyze` "
                        "(default %(default)s)")
    p.add_argument("--finetune-epochs", type=float, default=0,
                   help="epochs of quantization-aware training, fractions allowed (default 0: none)")
    for flag, name, field, options in CONFIG_FLAGS:
        add_config_flag(p, flag, CONFIG_ARGUMENTS[name], field, dest=_dest(name, field), **options)
    p.add_argument("--input-shape", help="one input's shape, e.g. 3,224,224 (needed with --data none for a user model)")
    p.add_argument("-o", "--out", type=Path, default=Path("hessq-out"), help="output folder (default hessq-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _is_batches(obj: Any) -> bool:
    return isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, Mapping, tuple))


def load_data(spec: str, *, seed: int = 0) -> tuple[Iterable | None, Iterable | None]:
    """``(train, eval)`` batches for a data spec: ``fashion-mnist``, ``none`` or ``package.module:function``."""
    if spec == "none":
        return None, None
    if spec == "fashion-mnist":
        from hessq.data import fashion_mnist

        return fashion_mnist("train", batch_size=128, augment=True, seed=seed), fashion_mnist("test", batch_size=100)
    if ":" not in spec:
        raise ConfigError(f"--data must be 'fashion-mnist', 'none' or 'package.module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import the data module {mod_name!r} of --data {spec!r}: {exc}") from exc
    except AttributeError:
        raise ConfigError(f"module {mod_name!r} has no function {fn_name!r} (from --data {spec!r})") from None
    data = fn()
    if isinstance(data, Mapping):
        if "train" not in data:
            raise ConfigError(f"{spec} returned a dict without a 'train' entry (keys: {sorted(data)})")
        train, evaluation = data["train"], data.get("eval", data.get("test"))
    elif isinstance(data, tuple) and len(data) == 2 and all(_is_batches(d) for d in data):
        train, evaluation = data
    elif _is_batches(data):
        train, evaluation = data, None
    else:
        raise ConfigError(
            f"{spec} returned a {type(data).__name__}; it must return (inputs, targets) batches, a (train, eval) pair "
            "of them, or a dict with 'train' and 'eval'"
        )
    return train, evaluation


def configs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """compress's config objects from the command line; an error names the flag as typed."""
    fields: dict[str, dict[str, Any]] = {name: {} for name in CONFIG_ARGUMENTS}
    for flag, name, field, _ in CONFIG_FLAGS:
        value = getattr(args, _dest(name, field))
        fields[name][field] = _PARSE[field](value, flag) if isinstance(value, str) and field in _PARSE else value
    if args.sensitivity in ("hessian", "kl"):
        fields["sensitivity"]["method"] = args.sensitivity
    fields["distill"]["input_range"] = BUNDLED_INPUT_RANGES.get(args.model)
    try:
        configs = {name: CONFIG_ARGUMENTS[name](**values) for name, values in fields.items()}
    except ConfigError as exc:  # name the option as typed on the command line
        raise type(exc)(cli_names(str(exc))) from None
    if not args.finetune_epochs > 0:
        configs["finetune"] = None
    else:
        configs["finetune"] = configs["finetune"].replace(epochs=args.finetune_epochs)
    return configs


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """compress's keyword options from the command line, every one checked (nothing is loaded yet)."""
    from hessq.pipeline import check_options

    check_number(args.finetune_epochs, "--finetune-epochs", low=0, allow_none=True)
    if args.finetune_max_steps is not None and not args.finetune_epochs > 0:
        raise ConfigError("--finetune-steps needs --finetune-epochs (QAT runs only with a positive number of epochs)")
    if args.checkpoint is not None:
        check_readable(args.checkpoint, "--checkpoint")
    if args.sensitivity not in ("hessian", "kl"):
        check_readable(args.sensitivity, "--sensitivity (a sensitivity.json; or 'hessian' or 'kl')")
    if args.plan_latency_table is not None:
        check_readable(args.plan_latency_table, "--latency-table")
    if args.data not in ("fashion-mnist", "none", *TEXT_DATA) and ":" not in args.data:
        raise ConfigError(f"--data must be 'fashion-mnist', 'none', 'bbc', 'tweets' or 'package.module:function', "
                          f"got {args.data!r}")
    if is_hf_spec(args.model):
        check_hf_spec(args.model)
        if args.data in ("fashion-mnist", "none") and args.model[3:] not in TASK_MODELS:
            raise ConfigError(f"--model {args.model} needs text data: --data bbc, tweets or package.module:function")
    shape = parse_input_shape(args.input_shape, args.model) if args.input_shape or args.data == "none" else None
    options = dict(configs_from_args(args), input_shape=shape, out_dir=args.out, model_name=args.model, seed=args.seed,
                   progress=not args.no_progress)
    try:
        return check_options(**options)
    except ConfigError as exc:
        raise type(exc)(cli_names(str(exc))) from None


def cli_names(message: str) -> str:
    """``message`` with each config field (``PlanConfig.size_limit``) named by its flag (``--size-limit``)."""
    for flag, name, field, _ in CONFIG_FLAGS:
        message = message.replace(f"{CONFIG_ARGUMENTS[name].__name__}.{field}", flag)
    return message.replace("seed must", "--seed must")


def _interrupt_note(out: Path) -> Callable[[], str]:
    """What the one line printed on Ctrl-C / SIGTERM says about the output folder."""
    import time

    started = time.time()

    def note() -> str:
        from hessq.pipeline import qat_checkpoint_path

        results = out / "results.json"
        if results.exists() and results.stat().st_mtime >= started:  # the signal came during the final swap
            return f"{out} holds this run's complete output"
        text = f"{out} is as it was before this run"
        if qat_checkpoint_path(out).exists():
            text += f"; QAT progress is kept in {qat_checkpoint_path(out)}: rerun the same command to resume"
        return text
    return note


def run(args: argparse.Namespace) -> int:
    import hessq
    from hessq.report import results_table
    from hessq.sensitivity import Sensitivity

    options = _options(args)  # every option checked before anything is loaded or analysed
    args.interrupt_note = _interrupt_note(args.out)
    task = load_task(args.model, args.data, seed=args.seed, progress=not args.no_progress)
    if task is not None:
        model, train, evaluation = task.model, task.train, task.evaluation
        options.update(metric=task.metric, metric_name=task.metric_name, model_name=task.name, loss_fn=task.loss_fn)
        if task.loss_fn is not None and options.get("finetune") is not None:
            if options["finetune"].hidden_weight > 0:
                raise ConfigError(f"--hidden-weight distills from the FP32 model, but {task.name} trains on its own "
                                  "loss, without distillation: leave --hidden-weight out")
            options["finetune"] = options["finetune"].replace(distill=False)  # not class scores: train on the task loss
        if options.get("input_shape") is None:
            options["input_shape"] = task.input_shape
    else:
        model = hf_model(args.model) if is_hf_spec(args.model) else load_model(args.model, args.checkpoint)
        train, evaluation = load_data(args.data, seed=args.seed)
    if args.sensitivity not in ("hessian", "kl"):
        options["sensitivity"] = Sensitivity.load(args.sensitivity)
        options["sensitivity"].check_model(model)
    try:
        result = hessq.compress(model, train, eval_data=evaluation, **options)
    except ArtifactError as exc:  # a QAT checkpoint that cannot be resumed: name the command-line way out
        raise type(exc)(str(exc).replace("FinetuneConfig(resume=False) (--no-resume)", "--no-resume")) from None
    resumed = result.meta.get("finetune_resumed")
    if resumed:
        print(f"resumed QAT from step {resumed['from_step']} of {result.meta['finetune_steps']}, {resumed['checkpoint']}")
    print()
    print(results_table(result.rows, metric=result.meta.get("metric", "top-1")))
    print(f"\nwrote {', '.join(Path(p).name for p in result.files.values())} to {args.out}/")
    if "report" in result.files:
        print(f"report: {result.files['report']}")
    return 0
