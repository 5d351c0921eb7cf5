"""``hessq quantize``: a model and a bit plan to a calibrated integer model file (and ONNX)."""

from __future__ import annotations

import argparse

from hessq._checks import check_int
from hessq._errors import ConfigError
from hessq._io import check_writable
from hessq.cli._common import (
    add_config_flag,
    add_data_argument,
    add_model_arguments,
    check_data_options,
    check_readable,
    load_distilled,
    load_model,
    parse_ints,
)
from hessq.pipeline import QuantizeConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model with a bit plan, calibrate it and write the integer model")
    add_model_arguments(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--plan", help="plan.json from `hessq plan`")
    which.add_argument("--bits", default=None, help="uniform W or W,A bits (default 8: W8A8; first/last stay 8-bit)")
    add_data_argument(p, purpose="calibration data")
    add_config_flag(p, "--calibration-batches", QuantizeConfig, "calibration_batches", type=int,
                    help="Fashion-MNIST batches of 128 used to calibrate; distilled data is used whole")
    p.add_argument("--evaluate", action="store_true", help="print top-1 on the Fashion-MNIST test set")
    p.add_argument("-o", "--output", default="model.hq", help="integer model file (default model.hq)")
    p.add_argument("--onnx", help="also export ONNX here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import hessq

    from hessq.quantizer import check_act_bits, check_weight_bits

    # Every option and path first: a mistake is reported before any model is loaded or calibrated.
    if args.plan:
        from hessq.plan import BitPlan

        plan = BitPlan.load(check_readable(args.plan, "--plan"))
    else:
        parts = parse_ints(args.bits or "8", "--bits")
        if len(parts) not in (1, 2):
            raise ConfigError(f"--bits takes W or W,A, got {args.bits!r}")
        try:
            check_weight_bits(parts[0])
            if len(parts) == 2:
                check_act_bits(parts[1])
        except ConfigError as exc:
            raise ConfigError(f"--bits {args.bits}: {exc}") from None
        plan = parts[0] if len(parts) == 1 else (parts[0], parts[1])
    check_int(args.calibration_batches, "--calibration-batches", low=1, allow_none=True)
    check_data_options(args)
    check_writable(args.output, "-o/--output")
    if args.onnx:
        check_writable(args.onnx, "--onnx")
    model = load_model(args.model, args.checkpoint)
    distilled = load_distilled(args, model)
    if distilled is not None:
        calibration = distilled.batches()  # inputs only: calibration needs no labels
        calibrated_on = {"data": "distilled", "data_free": True, "num_samples": distilled.num_samples,
                         "source": distilled.meta.get("source")}
    else:
        from hessq.data import fashion_mnist

        calibration = fashion_mnist("train", batch_size=128, shuffle=True, seed=args.seed).take(args.calibration_batches)
        calibrated_on = {"data": "fashion-mnist/train", "data_free": False,
                         "num_samples": sum(len(x) for x, _ in calibration)}
    torch.manual_seed(args.seed)
    qmodel = hessq.quantize(model, plan, calibration, progress=True)
    imodel = hessq.to_integer(qmodel)
    imodel.meta["calibration"] = calibrated_on  # the file says whether it was made without data
    imodel.save(args.output)
    print(f"wrote {args.output} ({imodel.size_bytes() / 1024:.1f} KiB of weights and constants)")
    if args.onnx:
        hessq.export_onnx(imodel, args.onnx)
        print(f"wrote {args.onnx}")
    if args.evaluate:
        from hessq.data import fashion_mnist

        acc = hessq.accuracy(qmodel, fashion_mnist("test", batch_size=100), progress=True)
        print(f"top-1 on the Fashion-MNIST test set: {100 * acc:.2f}%")
    return 0
