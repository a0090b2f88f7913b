"""`dast demo`: the whole method on the built-in synthetic domains (CPU, minutes)."""

from __future__ import annotations

import argparse

from dast.data.synthetic import DEFAULT_SHIFT, SHIFTS


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser(name, help="run source-only, baseline, DA, DAST and oracle on synthetic domains",
                       description="Train and compare the DAST variants on procedurally generated game-like and "
                                   "camera-like street scenes, on the CPU. Writes DIR/report.json and figures.")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (about 20 s on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--shift", choices=SHIFTS, default=DEFAULT_SHIFT,
                   help="what differs between the synthetic source and target: appearance only (a shared layout "
                        "distribution) or appearance and layout (the original demo domains); default: %(default)s")
    p.add_argument("--workers", type=int, default=None,
                   help="variants trained at the same time, one process each (default: CPU cores, at most 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from dast.demo import format_report, run_demo

    from dast.errors import UserError

    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    report = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress, workers=args.workers,
                      shift=args.shift)
    print(format_report(report))
    print(f"seed {report['seed']}, {report['seconds']:.0f} s; report: {args.out}/report.json, figures: "
          + ", ".join(f"{args.out}/{f}" for f in report["figures"]))
    return 0
