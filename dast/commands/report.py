"""``dast report``: render a run directory as one self-contained HTML page."""

from __future__ import annotations

import argparse
from typing import Any

from dast.commands._common import add_device_argument, resolve_device
from dast.errors import UserError


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="write an HTML report of a training run or a demo folder",
        description="Render RUN_DIR (made by `dast train --out`) as one self-contained HTML page: run status, "
        "final per-class IoU, mIoU and loss curves, sample predictions with attention maps, pseudo labels "
        "of each round and the config. Works on unfinished runs. Every image is embedded, so the page "
        "can be copied anywhere. Given a folder made by `dast demo --out` instead, it writes each run's "
        "report in runs/<run>/report.html and a demo page with the results table, the figures and links "
        "to those run reports.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run directory written by `dast train`, or a folder written by `dast demo`"
    )
    p.add_argument("--out", default=None, help="output HTML file (default: RUN_DIR/report.html)")
    p.add_argument(
        "--samples",
        type=int,
        default=4,
        help="how many val images (target images without a val set) to predict; 0 skips it (default 4)",
    )
    add_device_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    from dast.reporting import write_report  # noqa: PLC0415 - lazy: keeps dast --help fast
    from dast.reporting.demo_page import is_demo_folder, write_demo_report  # noqa: PLC0415 - lazy: keeps dast --help fast

    if args.samples < 0:
        raise UserError(f"--samples must be 0 or more, got {args.samples}")
    device = resolve_device(args.device) if args.samples > 0 else "cpu"
    if is_demo_folder(args.run_dir):
        path, runs = write_demo_report(args.run_dir, args.out, samples=args.samples, device=device)
        for link in runs:
            print(f"wrote {link.report}" if link.report is not None else f"skipped {link.name}: {link.note}")
    else:
        path = write_report(args.run_dir, args.out, samples=args.samples, device=device)
    print(f"wrote {path}")
    return 0
