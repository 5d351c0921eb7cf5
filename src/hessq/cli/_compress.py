"""``hessq compress``: the whole pipeline from the command line, every artefact written to one folder."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hessq._checks import check_int, check_number
from hessq._errors import ArtifactError, ConfigError
from hessq.cli._common import (
    BUNDLED_INPUT_RANGES,
    add_model_arguments,
    check_readable,
    load_model,
    parse_input_shape,
    parse_ints,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="sensitivity → plan → quantize → (QAT) → integer model → verify → ONNX → report.html, in one folder",
    )
    add_model_arguments(p)
    p.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist', 'none' (data-free: ZeroQ distilled inputs) or 'package.module:function' "
                        "returning (inputs, targets) batches, a (train, eval) pair, or a dict with 'train' and 'eval'")
    p.add_argument("--size-limit", help="bytes, or a percentage between all-lowest and all-highest like 50%%")
    p.add_argument("--bops-limit", help="bit operations, or a percentage")
    p.add_argument("--latency-limit", help="seconds, or a percentage (the latency table is measured on ONNX Runtime)")
    p.add_argument("--weight-bits", default="4,8", help="candidate weight bit widths (default 4,8)")
    p.add_argument("--act-bits", type=int, default=8, help="activation bits (default 8)")
    p.add_argument("--sensitivity", default="hessian",
                   help="'hessian' (Hutchinson traces), 'kl' (ZeroQ) or a sensitivity.json from `hessq analyze`")
    p.add_argument("--finetune-epochs", type=float, default=0,
                   help="epochs of quantization-aware training, fractions allowed (default 0: none)")
    p.add_argument("--finetune-steps", type=int, default=None, help="stop QAT after this many steps")
    p.add_argument("--no-resume", action="store_true",
                   help="start QAT over even when the output folder holds a checkpoint of an earlier run")
    p.add_argument("--lr", type=float, default=0.01, help="QAT learning rate (default 0.01)")
    p.add_argument("--calibration-batches", type=int, default=8, help="batches used to set the ranges (default 8)")
    p.add_argument("--baselines", default="8,4", help="uniform weight widths evaluated for comparison (default 8,4; 'none')")
    p.add_argument("--pareto-points", type=int, default=40, help="size limits on the Pareto frontier (default 40; 0 = none)")
    p.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime latency measurements")
    p.add_argument("--onnx-mode", choices=("exact", "fast"), default="exact",
                   help="exact: bit-exact integer graph; fast: fused QLinearConv kernels (default exact)")
    p.add_argument("--input-shape", help="one input's shape, e.g. 3,224,224 (needed with --data none for a user model)")
    p.add_argument("--distilled-samples", type=int, default=64, help="distilled inputs with --data none (default 64)")
    p.add_argument("--distill-steps", type=int, default=500, help="Adam steps of distillation (default 500)")
    p.add_argument("--distill-label-weight", type=float, default=0.0,
                   help="with --data none: weight of cross-entropy to random classes in the distillation (0 = plain ZeroQ)")
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


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """compress's keyword options from the command line, every one checked (nothing is loaded yet)."""
    import hessq
    from hessq.pipeline import check_options

    check_number(args.finetune_epochs, "--finetune-epochs", low=0, allow_none=True)
    check_int(args.finetune_steps, "--finetune-steps", low=1, allow_none=True)
    check_number(args.lr, "--lr", low=0, strict=True, allow_none=True)
    if args.finetune_steps is not None and not args.finetune_epochs > 0:
        raise ConfigError("--finetune-steps needs --finetune-epochs (QAT runs only with a positive number of epochs)")
    if args.checkpoint is not None:
        check_readable(args.checkpoint, "--checkpoint")
    if args.sensitivity not in ("hessian", "kl"):
        check_readable(args.sensitivity, "--sensitivity (a sensitivity.json; or 'hessian' or 'kl')")
    if args.data not in ("fashion-mnist", "none") and ":" not in args.data:
        raise ConfigError(f"--data must be 'fashion-mnist', 'none' or 'package.module:function', got {args.data!r}")
    shape = parse_input_shape(args.input_shape, args.model) if args.input_shape or args.data == "none" else None
    finetune = None
    if args.finetune_epochs > 0:
        finetune = hessq.FinetuneConfig(epochs=args.finetune_epochs, lr=args.lr, max_steps=args.finetune_steps,
                                        resume=not args.no_resume)
    options = dict(
        size_limit=args.size_limit, bops_limit=args.bops_limit, latency_limit=args.latency_limit,
        weight_bits=parse_ints(args.weight_bits, "--weight-bits"), act_bits=args.act_bits,
        finetune=finetune or False, calibration_batches=args.calibration_batches,
        baselines=[] if args.baselines == "none" else parse_ints(args.baselines, "--baselines"),
        pareto_points=args.pareto_points, measure_latency=not args.no_latency, onnx_mode=args.onnx_mode,
        input_shape=shape, num_distilled=args.distilled_samples, distill_steps=args.distill_steps,
        distill_input_range=BUNDLED_INPUT_RANGES.get(args.model), distill_label_weight=args.distill_label_weight,
        out_dir=args.out, model_name=args.model, seed=args.seed, progress=not args.no_progress,
    )
    try:
        check_options(**options)
    except ConfigError as exc:  # name the option as typed on the command line
        raise ConfigError(_cli_names(str(exc))) from None
    return options


_OPTION_FLAGS = {"size_limit": "--size-limit", "bops_limit": "--bops-limit", "latency_limit": "--latency-limit",
                 "weight_bits": "--weight-bits", "act_bits": "--act-bits",
                 "pareto_points": "--pareto-points", "calibration_batches": "--calibration-batches",
                 "num_distilled": "--distilled-samples", "distill_steps": "--distill-steps",
                 "distill_label_weight": "--distill-label-weight", "baselines": "--baselines", "seed": "--seed"}


def _cli_names(message: str) -> str:
    for name, flag in _OPTION_FLAGS.items():
        if message.startswith(name):
            return flag + message[len(name):]
    return message


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
    model = load_model(args.model, args.checkpoint)
    train, evaluation = load_data(args.data, seed=args.seed)
    sensitivity: Any = args.sensitivity
    if sensitivity not in ("hessian", "kl"):
        sensitivity = Sensitivity.load(sensitivity)
        sensitivity.check_model(model)
    try:
        result = hessq.compress(model, train, eval_data=evaluation, sensitivity=sensitivity, **options)
    except ArtifactError as exc:  # a QAT checkpoint that cannot be resumed: name the command-line way out
        raise type(exc)(str(exc).replace("FinetuneConfig(resume=False) (--no-resume)", "--no-resume")) from None
    resumed = result.meta.get("finetune_resumed")
    if resumed:
        print(f"resumed QAT from step {resumed['from_step']} of {result.meta['finetune_steps']}, {resumed['checkpoint']}")
    print()
    print(results_table(result.rows))
    print(f"\nwrote {', '.join(Path(p).name for p in result.files.values())} to {args.out}/")
    if "report" in result.files:
        print(f"report: {result.files['report']}")
    return 0
