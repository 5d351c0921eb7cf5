"""``hessq plan``: choose bits per layer from a sensitivity file; write plan.json and a table."""

from __future__ import annotations

import argparse

from hessq._errors import ConfigError
from hessq.cli._common import (
    BUNDLED_INPUT_SHAPES,
    add_config_flag,
    add_model_arguments,
    load_model,
    parse_input_shape,
    parse_ints,
)
from hessq.pipeline import PlanConfig
from hessq.plan import CURVATURES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose weight bits per layer (HAWQ-V3 ILP) from a sensitivity file",
        description=(
            "Choose a weight bit width per layer that minimises the Hessian-weighted perturbation under "
            "size / BOPs / latency limits. Limits are absolute (bytes, BOPs, seconds) or relative, e.g. "
            "'50%%' = halfway between the all-lowest and the all-highest setting. Needs no data: the sensitivity "
            "may come from real data, from distilled data (`hessq analyze --data none`), or be ZeroQ's KL "
            "sensitivity (`hessq distill --sensitivity`), whose KL per bit width is used as the perturbation."
        ),
    )
    p.add_argument("sensitivity", help="sensitivity JSON written by `hessq analyze` / Sensitivity.save")
    add_model_arguments(p)
    p.add_argument("--weight-bits", default=None,
                   help="candidate weight bit widths (default 2,3,4,5,6,7,8; for a KL sensitivity, the widths it was computed at)")
    add_config_flag(p, "--act-bits", PlanConfig, "act_bits", type=int, help="activation bit width")
    p.add_argument("--size-limit", help="bytes, or a percentage like 50%%")
    p.add_argument("--bops-limit", help="bit operations, or a percentage")
    p.add_argument("--latency-limit", help="seconds, or a percentage (needs --latency-table)")
    p.add_argument("--latency-table", help="JSON: layer -> bits -> seconds")
    p.add_argument("--tie", action="append", default=[], metavar="A,B[,...]", help="layers that must share bits (repeatable)")
    p.add_argument("--no-auto-ties", action="store_true", help="do not tie the convs that meet at a residual add")
    p.add_argument("--pin", action="append", default=[], metavar="LAYER=BITS", help="fix a layer's bits (repeatable)")
    add_config_flag(p, "--pin-first-last", PlanConfig, "pin_first_last", help="bits for the first and last layer, or 'none'")
    p.add_argument("--variant", choices=("trace", "eigenvalue"), default=None,
                   help="Tr(H)/n (HAWQ-V2/V3, the default) or λ/n (HAWQ); not for a KL sensitivity")
    p.add_argument("--stderr-margin", type=float, default=2.0,
                   help="standard errors added to each estimated trace, so that only a trace measured small "
                        "counts as insensitive (default 2; 0: the estimates themselves)")
    add_config_flag(p, "--curvature", PlanConfig, "curvature", choices=CURVATURES,
                    help="how a negative Hessian trace enters Ω: signed (HAWQ: the layer counts as least sensitive) "
                         "or magnitude (|trace|, as Q-BERT takes |mean λ|)")
    p.add_argument("--input-shape", help="example input shape without batch, for counting MACs, e.g. 3,224,224 "
                                         "(default: the bundled model's, else (C,28,28))")
    p.add_argument("-o", "--output", default="plan.json", help="where to write the plan (default plan.json)")
    p.add_argument("--table", help="also write the table here (Markdown if it ends in .md, else plain text)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hessq.plan import plan_bits
    from hessq.sensitivity import Sensitivity, is_kl_sensitivity

    from hessq._io import check_writable
    from hessq.cli._common import check_readable

    check_readable(args.sensitivity, "the sensitivity file")
    if args.latency_table:
        check_readable(args.latency_table, "--latency-table")
    check_writable(args.output, "-o/--output")
    if args.table:
        check_writable(args.table, "--table")
    sens = Sensitivity.load(args.sensitivity)
    if is_kl_sensitivity(sens) and args.variant is not None:
        # A KL sensitivity has no traces or eigenvalues: its Ω is the KL itself, so a variant would be ignored.
        raise ConfigError(f"{args.sensitivity} is a ZeroQ KL sensitivity: its KL per bit width is the perturbation, "
                         "--variant applies only to a Hessian sensitivity (`hessq analyze`)")
    # A KL sensitivity holds Ω only at the widths it was computed at: those are the candidates.
    default_bits = list(sens.meta.get("weight_bits", [])) if is_kl_sensitivity(sens) else [2, 3, 4, 5, 6, 7, 8]
    model = load_model(args.model, args.checkpoint)
    input_shape = (parse_input_shape(args.input_shape, args.model)
                   if args.input_shape or args.model in BUNDLED_INPUT_SHAPES else None)
    pins = {}
    for item in args.pin:
        if "=" not in item:
            raise ConfigError(f"--pin takes LAYER=BITS, got {item!r}")
        name, bits = item.rsplit("=", 1)
        pins[name] = parse_ints(bits, "--pin bits")[0]
    pfl = args.pin_first_last
    if isinstance(pfl, str):
        pfl = None if pfl.lower() == "none" else parse_ints(pfl, "--pin-first-last")[0]
    plan = plan_bits(
        model,
        sens,
        weight_bits=parse_ints(args.weight_bits, "--weight-bits") if args.weight_bits else default_bits,
        act_bits=args.act_bits,
        size_limit=args.size_limit,
        bops_limit=args.bops_limit,
        latency_limit=args.latency_limit,
        latency_table=args.latency_table,
        ties=[[n.strip() for n in t.split(",")] for t in args.tie],
        auto_ties=not args.no_auto_ties,
        pins=pins,
        pin_first_last=pfl,
        variant=args.variant or "trace",
        input_shape=input_shape,
        stderr_margin=args.stderr_margin,
        curvature=args.curvature,
    )
    plan.save(args.output)
    print(plan.table(markdown=False), end="")
    if args.table:
        from hessq._io import write_text_atomic

        write_text_atomic(args.table, plan.table(markdown=str(args.table).endswith(".md")))
    print(f"wrote {args.output}" + (f" and {args.table}" if args.table else ""))
    return 0
