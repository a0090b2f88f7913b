"""``dast make-data``: write the synthetic demo domains as ``folder`` datasets to inspect."""

from __future__ import annotations

import argparse
from pathlib import Path

from dast.commands._common import add_progress_argument, examples
from dast.data.synthetic import (
    DEFAULT_SHIFT,
    DOMAINS,
    MIN_SIZE,
    SHIFTS,
    write_folder_dataset,
)
from dast.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description=(
            "Write procedurally generated street scenes (the data of `dast demo`) as folder datasets: "
            "images/<stem>.png, labels/<stem>.png (class indices) and classes.yaml. "
            "With --domain both, DIR/source and DIR/target are written."
        ),
        epilog=examples(
            "dast make-data --out synthetic/ --domain both --count 50",
            "dast make-data --out tiny_target --domain target --count 4 --size 64 32",
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--domain", choices=[*DOMAINS, "both"], default="both", help="which domain to write (default: both)")
    p.add_argument("--count", type=int, default=200, metavar="N", help="scenes per domain (default: 200)")
    p.add_argument(
        "--size", type=int, nargs=2, default=(128, 64), metavar=("W", "H"), help="image size (default: 128 64)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="generator seed (default: 0)")
    p.add_argument(
        "--shift",
        choices=SHIFTS,
        default=DEFAULT_SHIFT,
        help="what differs between the domains: appearance only (the same label maps for the same "
        "seed and index), appearance and layout (the original demo domains), or photographic (the "
        "same label maps; the target's surfaces textured from real photographs); default: %(default)s",
    )
    add_progress_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UserError(f"--count must be at least 1, got {args.count}")
    if args.seed < 0:
        raise UserError(f"--seed must be non-negative, got {args.seed}")
    w, h = args.size
    if w < MIN_SIZE or h < MIN_SIZE:
        raise UserError(f"--size must be at least {MIN_SIZE} {MIN_SIZE}, got {w} {h}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out exists and is not a directory: {out}")
    domains = list(DOMAINS) if args.domain == "both" else [args.domain]
    progress = not args.no_progress
    for domain in domains:
        root = out / domain if args.domain == "both" else out
        write_folder_dataset(root, domain, args.count, args.seed, (w, h), progress=progress, shift=args.shift)
        print(f"wrote {args.count} {domain} scenes ({w}x{h}, {args.shift} shift) to {root}")
    return 0
