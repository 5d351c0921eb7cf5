"""``hessq distill``: ZeroQ distilled inputs for a model (no data needed) -> distilled.pt, optionally its KL sensitivity."""

from __future__ import annotations

import argparse
from pathlib import Path

from hessq._checks import check_int, check_number
from hessq._errors import ConfigError
from hessq._io import check_writable
from hessq.cli._common import (
    BUNDLED_INPUT_RANGES,
    add_config_flag,
    add_model_arguments,
    load_model,
    parse_input_shape,
    parse_ints,
)
from hessq.pipeline import DistillConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="synthesise inputs from the model's BatchNorm statistics (ZeroQ; writes distilled.pt)",
        description=(
            "Distil inputs whose per-channel mean and std at every BatchNorm layer match its running statistics "
            "(ZeroQ). The result calibrates a quantized model, and --sensitivity also writes ZeroQ's KL "
            "sensitivity of every layer, so the pipeline needs no data at all."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--input-shape", help="one sample's shape, e.g. 3,224,224 (default: the bundled model's; "
                                         "required for a model given as package.module:factory)")
    add_config_flag(p, ("-n", "--num-samples"), DistillConfig, "num_samples", type=int, help="inputs to synthesise")
    add_config_flag(p, "--steps", DistillConfig, "steps", type=int, help="Adam steps per batch")
    add_config_flag(p, "--lr", DistillConfig, "lr", type=float, help="Adam learning rate on the pixels")
    add_config_flag(p, "--batch-size", DistillConfig, "batch_size", type=int, help="inputs optimised together")
    p.add_argument("--seed", type=int, default=0)
    add_config_flag(p, "--label-weight", DistillConfig, "label_weight", type=float,
                    help="weight of a cross-entropy term pulling each input towards a random class (0 = plain ZeroQ; "
                         "1 makes the last layers' ranges closer to real data's)")
    p.add_argument("--input-range", help="LOW,HIGH: keep pixels in the range of valid preprocessed inputs "
                                          "(default for efficientnet_lite0: -0.9921875,1; else unbounded)")
    p.add_argument("--sensitivity", type=Path, help="also write ZeroQ's KL sensitivity on the distilled data to this JSON")
    p.add_argument("--weight-bits", default="2,4,6,8", help="bit widths of the KL sensitivity (default 2,4,6,8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", type=Path, default=Path("distilled.pt"), help="where to write the inputs (default distilled.pt)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hessq.distill import distill_data

    from hessq.quantizer import check_weight_bits

    # Every option and path first: a mistake is reported before any distillation runs.
    check_int(args.num_samples, "-n/--num-samples", low=1, allow_none=True)
    check_int(args.steps, "--steps", low=1, allow_none=True)
    check_int(args.batch_size, "--batch-size", low=1, allow_none=True)
    check_number(args.lr, "--lr", low=0, strict=True, allow_none=True)
    check_number(args.label_weight, "--label-weight", low=0, allow_none=True)
    check_writable(args.output, "-o/--output")
    bits = parse_ints(args.weight_bits, "--weight-bits")
    if args.sensitivity:
        check_writable(args.sensitivity, "--sensitivity")
        if not bits:
            raise ConfigError("--weight-bits is empty: give the widths of the KL sensitivity, e.g. 2,4,6,8")
        try:
            for b in bits:
                check_weight_bits(b)
        except ConfigError as exc:
            raise ConfigError(f"--weight-bits: {exc}") from None
    if args.input_range:
        try:
            lo, hi = (float(v) for v in args.input_range.split(","))
        except ValueError:
            raise ConfigError(f"--input-range must be LOW,HIGH, got {args.input_range!r}") from None
        if not lo < hi:  # also refuses NaN
            raise ConfigError(f"--input-range must be LOW,HIGH with LOW < HIGH, got {args.input_range!r}")
        input_range = (lo, hi)
    else:
        input_range = BUNDLED_INPUT_RANGES.get(args.model)
    model = load_model(args.model, args.checkpoint)  # before the shape, so a mistyped --model is reported as such
    shape = parse_input_shape(args.input_shape, args.model)
    data = distill_data(
        model, args.num_samples, shape, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, progress=not args.no_progress, input_range=input_range, label_weight=args.label_weight,
    )
    data.meta["model"] = args.model
    data.save(args.output)
    print(
        f"distilled {data.num_samples} inputs of shape {tuple(shape)} in {data.seconds:.1f}s: statistics loss "
        f"{data.initial_loss:.4g} (noise) -> {data.loss:.4g} over {data.num_bn_layers} BatchNorm layers"
    )
    print(f"wrote {args.output}")
    if args.sensitivity:
        from hessq.sensitivity import kl_sensitivity

        sens = kl_sensitivity(model, data, weight_bits=bits, progress=not args.no_progress)
        sens.meta["data"] = {"distilled": str(args.output), **{k: v for k, v in data.summary().items() if k != "batch_losses"}}
        sens.meta["data_free"] = True  # as `hessq analyze --data none` records it
        sens.save(args.sensitivity)
        top = sorted(sens, key=lambda n: -sens[n].extra["kl"][str(min(bits))])[:3]
        print(f"wrote {args.sensitivity} (KL sensitivity at {bits} bits; most sensitive at {min(bits)} bits: {', '.join(top)})")
    return 0
