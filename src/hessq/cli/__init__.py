"""The ``hessq`` command line: one sub-command per stage, each reading and writing files.

An error hessq raises on purpose (:class:`hessq.HessqError`), a file-system error (``OSError``)
and an interrupt (Ctrl-C, SIGTERM) print one line ``hessq <command>: error: <message>`` and exit
non-zero: 1, 130 for Ctrl-C, 143 for SIGTERM. Anything else is a bug and keeps its traceback;
``hessq --debug ...`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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

#: Exit status of a run stopped by SIGINT (Ctrl-C) and by SIGTERM: 128 + the signal number, as shells report it.
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so ``finally`` blocks and cleanups run as for Ctrl-C.

    A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it.
    """


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hessq", description="Hessian-aware mixed-precision quantization")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(name).add_parser(sub)
    for command in sub.choices.values():  # also accepted after the sub-command: hessq compress ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of any error")
    return parser


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while the block runs (only the main thread can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _one_line(exc: BaseException) -> str:
    """The error's message on one line; an OSError as 'what: path'."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    from hessq._errors import HessqError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prefix = f"hessq {args.command}: error:"
    try:
        with _sigterm_raises():
            return int(args.func(args) or 0)
    except (HessqError, OSError) as exc:
        if args.debug:
            raise
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        if args.debug:
            raise
        how = "Ctrl-C (SIGINT)" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
        note = getattr(args, "interrupt_note", None)
        print(f"{prefix} stopped by {how}{'; ' + note() if note else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(main())
