"""``hessq plan``: choose bits per layer from a sensitivity file; write plan.json and a table."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch
from torch import nn


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose weight bits per layer (HAWQ-V3 ILP) from a sensitivity file",
        description=(
            "Choose a weight bit width per layer that minimises the Hessian-weighted perturbation under "
            "size / BOPs / latency limits. Limits are absolute (bytes, BOPs, seconds) or relative, e.g. "
            "'50%%' = halfway between the all-lowest and the all-highest setting."
        ),
    )
    p.add_argument("sensitivity", help="sensitivity JSON written by `hessq analyze` / Sensitivity.save")
    p.add_argument("--model", default="resnet20",
                   help="'resnet20' (the bundled Fashion-MNIST model) or 'package.module:factory' (called with no arguments)")
    p.add_argument("--checkpoint", help="a state_dict (.pt) to load into --model")
    p.add_argument("--weight-bits", default="2,3,4,5,6,7,8", help="candidate weight bit widths (default 2,3,4,5,6,7,8)")
    p.add_argument("--act-bits", type=int, default=8, help="activation bit width (default 8)")
    p.add_argument("--size-limit", help="bytes, or a percentage like 50%%")
    p.add_argument("--bops-limit", help="bit operations, or a percentage")
    p.add_argument("--latency-limit", help="seconds, or a percentage (needs --latency-table)")
    p.add_argument("--latency-table", help="JSON: layer -> bits -> seconds")
    p.add_argument("--tie", action="append", default=[], metavar="A,B[,...]", help="layers that must share bits (repeatable)")
    p.add_argument("--no-auto-ties", action="store_true", help="do not tie the convs that meet at a residual add")
    p.add_argument("--pin", action="append", default=[], metavar="LAYER=BITS", help="fix a layer's bits (repeatable)")
    p.add_argument("--pin-first-last", default="8", help="bits for the first and last layer, or 'none' (default 8)")
    p.add_argument("--variant", choices=("trace", "eigenvalue"), default="trace", help="Tr(H)/n (HAWQ-V2/V3) or λ/n (HAWQ)")
    p.add_argument("--input-shape", help="example input shape without batch, e.g. 1,28,28 (default (C,28,28))")
    p.add_argument("-o", "--output", default="plan.json", help="where to write the plan (default plan.json)")
    p.add_argument("--table", help="also write the table here (Markdown if it ends in .md, else plain text)")
    p.set_defaults(func=run)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def load_model(spec: str, checkpoint: str | None = None) -> nn.Module:
    if spec == "resnet20":
        from hessq.models import resnet20

        model = resnet20(pretrained=checkpoint is None)
    else:
        if ":" not in spec:
            raise ValueError(f"--model must be 'resnet20' or 'package.module:factory', got {spec!r}")
        mod_name, fn_name = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load model factory {spec!r}: {exc}") from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    model.eval()
    return model


def run(args: argparse.Namespace) -> int:
    from hessq.plan import plan_bits
    from hessq.sensitivity import Sensitivity

    sens = Sensitivity.load(args.sensitivity)
    model = load_model(args.model, args.checkpoint)
    pins = {}
    for item in args.pin:
        if "=" not in item:
            raise ValueError(f"--pin takes LAYER=BITS, got {item!r}")
        name, bits = item.rsplit("=", 1)
        pins[name] = _ints(bits, "--pin bits")[0]
    pfl = None if args.pin_first_last.lower() == "none" else _ints(args.pin_first_last, "--pin-first-last")[0]
    plan = plan_bits(
        model,
        sens,
        weight_bits=_ints(args.weight_bits, "--weight-bits"),
        act_bits=args.act_bits,
        size_limit=args.size_limit,
        bops_limit=args.bops_limit,
        latency_limit=args.latency_limit,
        latency_table=args.latency_table,
        ties=[[n.strip() for n in t.split(",")] for t in args.tie],
        auto_ties=not args.no_auto_ties,
        pins=pins,
        pin_first_last=pfl,
        variant=args.variant,
        input_shape=_ints(args.input_shape, "--input-shape") if args.input_shape else None,
    )
    plan.save(args.output)
    print(plan.table(markdown=False), end="")
    if args.table:
        from hessq._io import write_text_atomic

        write_text_atomic(args.table, plan.table(markdown=str(args.table).endswith(".md")))
    print(f"wrote {args.output}" + (f" and {args.table}" if args.table else ""))
    return 0
