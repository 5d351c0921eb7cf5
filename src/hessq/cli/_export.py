"""``hessq export``: an integer model file to ONNX, and its per-layer ONNX Runtime latency table."""

from __future__ import annotations

import argparse

from hessq._errors import ConfigError
from hessq.cli._common import add_config_flag
from hessq.pipeline import ExportConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export an integer model file to ONNX (and measure per-layer latency)")
    p.add_argument("model", help="integer model file written by `hessq quantize` or IntegerModel.save")
    p.add_argument("-o", "--output", default="model.onnx", help="ONNX file (default model.onnx)")
    add_config_flag(p, "--mode", ExportConfig, "onnx_mode", choices=("exact", "fast"),
                    help="exact: bit-exact with the integer model; fast: ONNX Runtime's fused QLinearConv")
    p.add_argument("--narrow-kernels", choices=("all", "none", "measured"), default="all",
                   help="fast mode: where a Linear of at most 4-bit weights runs on MatMulNBits (and such a table on "
                        "GatherBlockQuantized): all (the smallest file), none (every layer on the int8 kernels), or "
                        "measured (each layer on the kernel the latency table, measured first, times faster)")
    p.add_argument("--no-fuse-siblings", dest="fuse_siblings", action="store_false",
                   help="fast mode: keep Linears that read the same codes (query, key, value) as separate kernels "
                        "instead of one over their stacked weights (faster at large batches; slower at batch 1)")
    p.add_argument("--no-spinning", dest="spinning", action="store_false",
                   help="time the latency table with ONNX Runtime's intra-op spinning off (steadier on shared or "
                        "virtual machines with few cores)")
    p.add_argument("--latency-table", help="also measure each layer on ONNX Runtime and write the table (JSON) here")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for the latency table (default 1)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per layer (default 50; the median is kept)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hessq._io import check_writable
    from hessq._checks import check_int
    from hessq.cli._common import check_readable
    from hessq.integer import export_onnx, load_integer, measure_latency_table

    if args.narrow_kernels == "measured" and args.mode != "fast":
        raise ConfigError("--narrow-kernels measured chooses the kernels of --mode fast; --mode exact runs every "
                          "layer on exact integer operators. Add --mode fast, or leave --narrow-kernels out")
    check_readable(args.model, "the integer model file")
    check_writable(args.output, "-o/--output")
    if args.latency_table:
        check_writable(args.latency_table, "--latency-table")
    check_int(args.batch_size, "--batch-size", low=1, allow_none=True)
    check_int(args.repeats, "--repeats", low=1, allow_none=True)
    imodel = load_integer(args.model)
    table = None
    if args.latency_table or args.narrow_kernels == "measured":
        table = measure_latency_table(imodel, batch_size=args.batch_size, repeats=args.repeats, spinning=args.spinning)
    narrow = {"all": True, "none": False, "measured": table}[args.narrow_kernels]
    export_onnx(imodel, args.output, mode=args.mode, narrow_kernels=narrow, fuse_siblings=args.fuse_siblings)
    print(f"wrote {args.output} ({args.mode})")
    if args.latency_table:
        table.save(args.latency_table)
        print(f"wrote {args.latency_table}: {len(table)} layers, int8 total "
              f"{1e3 * sum(row[8] for row in table.values()):.3f} ms at batch {args.batch_size}")
    return 0
