"""The ``dast`` command line: parse arguments, call library functions, report errors.

User errors (:class:`dast.errors.UserError`) print one ``error: ...`` line and exit with
code 2. Other failures print ``internal error: ...`` and exit with code 1; ``--debug``
shows the traceback.

Only the module of the command that runs is imported (``dast --help`` lists the commands
from :data:`COMMANDS` alone), so the listing and the light commands start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Collection, Sequence
from typing import Any, NoReturn

from dast import __version__
from dast.errors import UserError

# (command, module in dast/commands/ with `add_parser(subparsers, name)` and `run(args)`,
# the one-line summary that `dast --help` lists)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("demo", "demo", "run source-only, baseline, DA, DAST, DAST online and oracle on synthetic domains"),
    ("train", "train", "train a model (stage 1 and self-training rounds)"),
    ("evaluate", "evaluate", "compute per-class IoU and mIoU on a labelled dataset"),
    ("predict", "predict", "segment target images with a checkpoint"),
    ("pseudo-label", "pseudo_label", "write class-balanced pseudo labels for the target images"),
    ("check-data", "check_data", "check a dataset's layout and files"),
    ("init-config", "init_config", "write a commented training config for your own image folders"),
    (
        "convert",
        "convert",
        "convert released checkpoints or ImageNet weights into a dast checkpoint, or colour labels into index labels",
    ),
    ("export", "export", "export the target model (segmentor + attention) to ONNX"),
    ("report", "report", "write an HTML report of a training run, a demo folder or a folder of runs"),
    ("bench", "bench", "time training steps, inference and pseudo-labelling (JSON lines)"),
    ("make-data", "make_data", "write the synthetic source/target street scenes as folder datasets"),
    ("sweep", "sweep", "run many trainings (configs x seeds) across GPUs"),
    ("configs", "configs", "list the packaged configs (one per paper row), or print one resolved"),
)
SUMMARIES = {name: summary for name, _, summary in COMMANDS}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that lines of a description or epilog that start with
    two spaces (the examples) are kept as written instead of being re-wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            keep = line.startswith("  ") or not line.strip()
            lines.append(indent + line if keep else super()._fill_text(line, width, indent))
        return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors follow the one-line ``error:`` contract."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


class _Commands(argparse._SubParsersAction):
    """The sub-command action: a command's ``--help`` line comes from :data:`COMMANDS`."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if name in SUMMARIES:
            kwargs.setdefault("help", SUMMARIES[name])
        return super().add_parser(name, **kwargs)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``dast`` parser. ``commands``: the commands whose modules are imported and whose
    arguments are defined (None: all); the others are listed by name and summary only."""
    parser = _Parser(
        prog="dast",
        description="Domain-adaptive semantic segmentation with DAST (AAAI 2021).",
        epilog="examples:\n  dast demo --out demo_quick --quick\n  dast train --config mine.yaml --out runs/mine "
        "--dry-run\n  dast <command> --help",
    )
    parser.add_argument("--version", action="version", version=f"dast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.register("action", "parsers", _Commands)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    sub.required = True
    for name, module, _ in COMMANDS:
        if commands is not None and name not in commands:
            sub.add_parser(name, add_help=False)  # listed by `dast --help`; never parsed
            continue
        mod = importlib.import_module(f"dast.commands.{module}")
        p = mod.add_parser(sub, name)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        p.set_defaults(_run=mod.run)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the top-level
    options take no value), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUMMARIES else None
    return None


WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(exc: BaseException) -> str:
    """The line (a line per problem) to print for a user error.

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
    words = list(sys.argv[1:] if argv is None else argv)
    command = chosen_command(words)
    parser = build_parser(() if command is None else (command,))
    args = parser.parse_args(words)
    debug = bool(getattr(args, "debug", False))
    try:
        code = args._run(args)
        return int(code or 0)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        # one line per problem (a config with three mistakes lists all three)
        sys.stderr.write("".join(f"error: {line}\n" for line in user_message(exc).splitlines()))
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
