"""The ``hessq`` command line: one sub-command per stage, each reading and writing files."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``add_parser(subparsers)``, which registers its sub-command and
# sets ``func`` (args -> exit code). Imported lazily so ``hessq --help`` stays fast.
_COMMANDS = [
    "hessq.cli._analyze",
    "hessq.cli._compress",
    "hessq.cli._demo",
    "hessq.cli._distill",
    "hessq.cli._export",
    "hessq.cli._plan",
    "hessq.cli._quantize",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hessq", description="Hessian-aware mixed-precision quantization")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"hessq {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
