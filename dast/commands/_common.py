"""Small helpers shared by the command modules: the flags every command spells alike
(``--device``, ``--set``, ``--no-progress``, ``--amp``, ``--seeds``), argument types and
path checks. Nothing here imports torch at module level: ``dast --help`` and the light
commands stay fast."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dast.errors import UserError
from dast.rundir import RunDir

if TYPE_CHECKING:
    import torch


def examples(*lines: str) -> str:
    """A ``--help`` epilog: ``examples:`` and one command per line (kept as written)."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default: cuda if available)"
    )


def add_set_argument(p: argparse.ArgumentParser, help: str = "override a config value (repeatable)") -> None:
    """The repeatable ``--set KEY=VALUE`` option, collected into ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


class _DeprecatedFlag(argparse.Action):
    """A store-true alias that still works but says which flag replaces it."""

    def __init__(self, option_strings: Sequence[str], dest: str, use: str, **kwargs: Any) -> None:
        self.use = use
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: Any) -> None:
        sys.stderr.write(f"note: {'/'.join(self.option_strings)} is deprecated; use {self.use}\n")
        setattr(namespace, self.dest, True)


def add_progress_argument(p: argparse.ArgumentParser, help: str = "no progress bars or progress lines") -> None:
    """``--no-progress`` (into ``args.no_progress``); ``--quiet`` is its deprecated alias."""
    p.add_argument("--no-progress", action="store_true", help=help)
    p.add_argument("--quiet", action=_DeprecatedFlag, dest="no_progress", use="--no-progress")


def add_amp_argument(p: argparse.ArgumentParser, help: str = "autocast dtype (default: none, float32)") -> None:
    """``--amp none|bf16|fp16`` (the names of :data:`dast.contexts.AMP_DTYPES`); ``off`` is a
    deprecated spelling of ``none``. ``args.amp`` holds the name; ``amp_dtype`` gives the dtype."""
    from dast.contexts import AMP_ALIASES, AMP_DTYPES  # noqa: PLC0415 - torch: only when the command is chosen

    def choice(text: str) -> str:
        if text in AMP_ALIASES:
            sys.stderr.write(f"note: --amp {text} is deprecated; use --amp {AMP_ALIASES[text]}\n")
            return AMP_ALIASES[text]
        return text

    p.add_argument("--amp", type=choice, choices=list(AMP_DTYPES), default="none", help=help)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a user error."""
    import torch  # noqa: PLC0415 - torch: only the commands that run a model need it

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number of at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def add_seeds_argument(p: argparse.ArgumentParser, default: list[str] | None, help: str) -> None:
    """``--seeds``: space- or comma-separated (``0 1 2``, ``0,1,2`` or both); read with :func:`parse_seeds`."""
    p.add_argument("--seeds", nargs="+", default=default, metavar="S", help=help)


def parse_seeds(words: Sequence[str | int]) -> list[int]:
    """``["0,1", "2"]`` -> ``[0, 1, 2]``: distinct whole numbers >= 0, else a UserError."""
    text = " ".join(str(w) for w in words)
    tokens = [t for w in words for t in str(w).replace(",", " ").split()]
    try:
        seeds = [int(t) for t in tokens]
    except ValueError:
        raise UserError(f"--seeds takes whole numbers (0 1 2 or 0,1,2), got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds takes distinct whole numbers >= 0 (0 1 2 or 0,1,2), got {text!r}")
    return seeds


def existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_file():
        raise UserError(f"{what} is not a file: {p}")
    return p


def existing_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_dir():
        raise UserError(f"{what} is not a directory: {p}")
    return p


def checkpoint_file(path: str) -> Path:
    """The checkpoint file ``path`` names. A run directory of ``dast train`` stands for its
    final model (a note says so); an unfinished one is a UserError naming the newest
    snapshot it has."""
    p = Path(path)
    if not p.is_dir():
        return existing_file(path, "checkpoint")
    run = RunDir(p)
    if not run.config.is_file():
        raise UserError(f"checkpoint is a directory, not a file: {p} (a .safetensors file or a run directory)")
    if run.final_model.is_file():
        sys.stderr.write(f"note: using the run's final model {run.final_model}\n")
        return run.final_model
    snapshots = [s for s in (run.stage(n).selected for n in reversed(run.stage_names())) if s.is_file()]
    hint = f"; its newest selected snapshot is {snapshots[0]}" if snapshots else ""
    raise UserError(
        f"run directory {p} has no final model ({run.final_model} is missing: the run is not finished){hint}"
    )
