"""Small helpers shared by the command modules."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from dast.errors import UserError


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default: cuda if available)"
    )


def add_set_argument(p: argparse.ArgumentParser, help: str = "override a config value (repeatable)") -> None:
    """The repeatable ``--set KEY=VALUE`` option, collected into ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a user error."""
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
