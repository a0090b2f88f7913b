"""The ``dast`` command line: parse arguments, call library functions, report errors.

User errors (:class:`dast.errors.UserError`) print one ``error: ...`` line and exit with
code 2. Other failures print ``internal error: ...`` and exit with code 1; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from dast import __version__
from dast.errors import UserError

# Each command lives in dast/commands/<module>.py with `add_parser(subparsers)` and `run(args)`.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("demo", "demo"),
    ("train", "train"),
    ("evaluate", "evaluate"),
    ("predict", "predict"),
    ("pseudo-label", "pseudo_label"),
    ("check-data", "check_data"),
    ("convert", "convert"),
    ("export", "export"),
    ("report", "report"),
    ("bench", "bench"),
    ("make-data", "make_data"),
    ("sweep", "sweep"),
    ("configs", "configs"),
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors follow the one-line ``error:`` contract."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dast", description="Domain-adaptive semantic segmentation with DAST (AAAI 2021).")
    parser.add_argument("--version", action="version", version=f"dast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    sub.required = True
    for name, module in COMMANDS:
        mod = importlib.import_module(f"dast.commands.{module}")
        p = mod.add_parser(sub, name)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        p.set_defaults(_run=mod.run)
    return parser


WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(exc: BaseException) -> str:
    """The one line to print for a user error.

    An error raised in a DataLoader worker process reaches the main process re-created
    with a message that holds the worker's traceback; its last line carries the
    original message, which is what the user needs.
    """
    text = str(exc).strip()
    if WORKER_TRACEBACK in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        cls = type(exc)
        for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__name__}: "):
            if last.startswith(prefix):
                return last[len(prefix) :]
        return last
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dast`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        code = args._run(args)
        return int(code or 0)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {user_message(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence of the CLI
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(f"internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)\n")
        return 1
