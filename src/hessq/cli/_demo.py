"""``hessq demo``: the whole pipeline on a bundled model and its data, written to a report.

ResNet-20 on Fashion-MNIST by default; ``--model minilm-tweets`` / ``minilm-bbc`` runs Q-BERT on the
pretrained MiniLM (fine-tuned on first use into the cache folder), ``--model codenet`` the detector."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hessq.cli._common import add_config_flag
from hessq.cli._tasks import TASK_MODELS, load_task
from hessq.pipeline import FinetuneConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="compress a bundled model end to end (ResNet-20 on Fashion-MNIST by default); "
                                    "write report.html")
    p.add_argument("--model", choices=("resnet20", *TASK_MODELS), default="resnet20",
                   help="resnet20 (Fashion-MNIST), minilm-tweets or minilm-bbc (Q-BERT on text), codenet (detection)")
    p.add_argument("--out", type=Path, default=Path("hessq-out"), help="output folder (default: hessq-out)")
    p.add_argument("--size-limit", default="50%", help="size limit of the mixed plan (default 50%%: halfway W4–W8)")
    p.add_argument("--qat-epochs", type=float, default=0.5,
                   help="epochs of quantization-aware training for the mixed plan and for W4A4 (default 0.5)")
    add_config_flag(p, "--qat-lr", FinetuneConfig, "lr", type=float, help="QAT learning rate")
    p.add_argument("--data", choices=("fashion-mnist", "none"), default="fashion-mnist",
                   help="none: data-free (ZeroQ distilled inputs; the test set only scores the result)")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images (default: all 10,000)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in about a minute: 500 test images, 20 Hessian samples, a few QAT steps, no latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import hessq
    from hessq.pipeline import evaluate_setting
    from hessq.data import fashion_mnist
    from hessq.models import resnet20
    from hessq.plan import evaluate_plan
    from hessq.report import results_table

    from hessq._checks import check_int, check_number
    from hessq.cli._compress import cli_names
    from hessq.pipeline import DEMO_CHECKPOINT, PlanConfig, QuantizeConfig, SensitivityConfig, check_options

    try:
        plan = PlanConfig(size_limit=args.size_limit, weight_bits=(4, 8), measure_latency=not args.quick)
    except hessq.ConfigError as exc:
        raise type(exc)(cli_names(str(exc))) from None
    check_options(out_dir=args.out)
    check_number(args.qat_epochs, "--qat-epochs", low=0, strict=True, allow_none=True)
    check_number(args.qat_lr, "--qat-lr", low=0, strict=True, allow_none=True)
    check_int(args.test_limit, "--test-limit", low=1, allow_none=True)
    progress = not args.no_progress
    if args.quick:
        args.test_limit = args.test_limit or 500
        args.qat_epochs = min(args.qat_epochs, 0.01)
    torch.manual_seed(args.seed)
    if args.model != "resnet20":
        return run_task_demo(args, progress)
    # batches of 100: the exact integer arithmetic runs about 3× faster than at 500 (less memory traffic)
    test = fashion_mnist("test", root=args.data_dir, batch_size=100, limit=args.test_limit)
    train = fashion_mnist("train", root=args.data_dir, batch_size=128, augment=True, seed=args.seed)
    model = resnet20(pretrained=True)
    data_free = args.data == "none"
    steps = max(1, round(args.qat_epochs * len(train)))
    qat = None if data_free else hessq.FinetuneConfig(epochs=args.qat_epochs, lr=args.qat_lr)
    result = hessq.compress(
        model, None if data_free else train, eval_data=test, plan=plan, finetune=qat,
        quantize=QuantizeConfig(baselines=((8, 8), (4, 4))), sensitivity=SensitivityConfig(max_samples=20 if args.quick else 100),
        model_name="resnet20 (bundled, Fashion-MNIST)", input_shape=(1, 28, 28), seed=args.seed, progress=progress,
    )
    if qat is not None:
        # The uniform W4A4 setting with the same QAT budget: how much the mixed plan's 8-bit layers buy.
        if progress:
            print("[extra] W4A4 with quantization-aware training", flush=True)
        calib = train.take(8)
        w4a4 = hessq.quantize(model, (4, 4), calib)
        hessq.finetune(w4a4, train, teacher=model, epochs=args.qat_epochs, lr=args.qat_lr, seed=args.seed,
                       checkpoint=args.out / DEMO_CHECKPOINT, resume=False, progress=progress)
        names = list(result.plan)
        bits = {n: 8 if n in (names[0], names[-1]) else 4 for n in names}  # first and last stay 8-bit
        costs = evaluate_plan(model, bits, result.sensitivity, act_bits=4, input_shape=(1, 28, 28))
        result.rows.append(evaluate_setting("W4A4 QAT", f"4 / 4 (QAT, {steps} steps)", hessq.to_integer(w4a4), test,
                                            costs=costs, input_shape=(1, 28, 28), progress=progress,
                                            latency_repeats=0 if args.quick else 30))
    result.meta["test_images"] = len(test.inputs)
    result.meta["qat_steps"] = 0 if qat is None else steps
    files = result.save(args.out)
    print()
    print(results_table(result.rows))
    print(f"\nfiles: {', '.join(Path(p).name for p in files.values())} in {args.out}/")
    print(f"report: {files['report']}")
    return 0


def _limited(batches, limit: int | None, batch_size: int):
    """The first ``limit`` samples of ``batches`` (whole batches), as a list; all of them when ``limit`` is None."""
    if limit is None:
        return batches
    return [b for _, b in zip(range(max(1, -(-limit // batch_size))), batches)]


def run_task_demo(args: argparse.Namespace, progress: bool) -> int:
    """A bundled task (MiniLM on text, or CoDeNet) through ``hessq.compress``: a Hessian plan at an average of
    4 weight bits over 2-8 (text) or the W4A8 size (detection), a short QAT, the report."""
    import hessq
    from hessq.pipeline import FinetuneConfig, PlanConfig, QuantizeConfig, SensitivityConfig
    from hessq.report import results_table

    task = load_task(args.model, "default", seed=args.seed, default_data="default", progress=progress)
    text = args.model.startswith("minilm")
    test = _limited(task.evaluation, args.test_limit, 64)
    plan = PlanConfig(size_limit=args.size_limit, weight_bits=(2, 3, 4, 8) if text else (4, 8),
                      pin_first_last=None if text else 8, measure_latency=False, pareto_points=10)
    sensitivity = SensitivityConfig(estimator="hutchinson" if text else "auto", max_samples=20 if args.quick else 60,
                                    time_budget=60 if args.quick else 240, batches=1)
    steps = 5 if args.quick else 100
    result = hessq.compress(
        task.model, task.train, eval_data=test, plan=plan, sensitivity=sensitivity,
        quantize=QuantizeConfig(baselines=((8, 8), (4, 8)), calibration_batches=4),
        finetune=FinetuneConfig(epochs=1, max_steps=steps, lr=2e-5 if text else args.qat_lr,
                                optimizer="adamw" if text else "sgd", distill=task.loss_fn is None),
        input_shape=task.input_shape, model_name=task.name, metric=task.metric, metric_name=task.metric_name,
        loss_fn=task.loss_fn, seed=args.seed, progress=progress)
    files = result.save(args.out)
    print()
    print(results_table(result.rows, metric=task.metric_name))
    print(f"\nfiles: {', '.join(Path(p).name for p in files.values())} in {args.out}/")
    print(f"report: {files['report']}")
    return 0
