"""``dast report``: render a run directory as one self-contained HTML page."""

from __future__ import annotations

import argparse
from typing import Any

from dast.commands._common import add_device_argument, examples, resolve_device
from dast.errors import UserError


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Render RUN_DIR (made by `dast train --out`) as one self-contained HTML page: run status, "
        "final per-class IoU, mIoU and loss curves, sample predictions with attention maps, pseudo labels "
        "of each round and the config. Works on unfinished runs. Every image is embedded, so the page "
        "can be copied anywhere. Given a folder made by `dast demo --out` instead, it writes each run's "
        "report in runs/<run>/report.html and a demo page with the results table, the figures and links "
        "to those run reports. Given any other folder, it writes every run directory's report found below it "
        "and one page with a comparison table of them all (status, method, final mIoU, per-class IoU).",
        epilog=examples(
            "dast report runs/mine              # runs/mine/report.html",
            "dast report demo_out               # the demo page and every run's page",
            "dast report runs/ --samples 0      # one comparison table over every run below runs/",
        ),
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run directory written by `dast train`, a folder written by `dast demo`, or a folder of run directories",
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
    from dast.reporting import (  # noqa: PLC0415 - lazy: keeps dast --help fast
        is_demo_folder,
        is_runs_folder,
        write_demo_report,
        write_report,
        write_runs_report,
    )

    if args.samples < 0:
        raise UserError(f"--samples must be 0 or more, got {args.samples}")
    device = resolve_device(args.device) if args.samples > 0 else "cpu"
    if is_demo_folder(args.run_dir):
        path, runs = write_demo_report(args.run_dir, args.out, samples=args.samples, device=device)
        for link in runs:
            print(f"wrote {link.report}" if link.report is not None else f"skipped {link.name}: {link.note}")
    elif is_runs_folder(args.run_dir):
        path, rows = write_runs_report(args.run_dir, args.out, samples=args.samples, device=device)
        for row in rows:
            print(f"wrote {row.report}" if row.report is not None else f"skipped {row.name}: {row.note}")
    else:
        path = write_report(args.run_dir, args.out, samples=args.samples, device=device)
    print(f"wrote {path}")
    return 0
