"""`dast demo`: the whole method on the built-in synthetic domains (CPU, minutes)."""

from __future__ import annotations

import argparse

from dast.commands._common import nonnegative_int
from dast.data.synthetic import DEFAULT_SHIFT, SHIFTS
from dast.errors import UserError


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--seeds takes whole numbers separated by commas, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds takes distinct whole numbers >= 0 separated by commas, got {text!r}")
    return seeds


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="run source-only, baseline, DA, DAST and oracle on synthetic domains",
        description="Train and compare the DAST variants on procedurally generated game-like and "
        "camera-like (or, with --shift photographic, photo-textured) street scenes, on the CPU. "
        "Writes DIR/report.json and figures.",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (about 30 s on 2 cores)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,...",
        help="several seeds (e.g. 0,1,2,3,4): each in DIR/seed<S>/, then mean +- std and paired "
        "differences in DIR/report.json and DIR/seeds.png",
    )
    p.add_argument(
        "--shift",
        choices=SHIFTS,
        default=DEFAULT_SHIFT,
        help="what differs between the synthetic source and target: appearance only (a shared layout "
        "distribution: textures, light, colours, optics), appearance and layout (the original "
        "demo domains), or photographic (the shared layout, with the target's surfaces textured "
        "from real photographs); default: %(default)s",
    )
    p.add_argument(
        "--timm",
        default=None,
        metavar="NAME",
        help="train every run with this timm CNN as the encoder instead of dast's tiny ResNet "
        "(e.g. resnet10t; random init, ImageNet input normalisation; needs pip install 'dast[timm]')",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs trained at the same time, one process each (default: CPU cores, at most 4)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars or heartbeat lines")
    return p


def run(args: argparse.Namespace) -> int:
    from dast.demo import format_report, format_seeds, run_demo, run_demo_seeds  # noqa: PLC0415 - lazy: keeps dast --help fast
    from dast.demo.config import timm_overrides  # noqa: PLC0415 - lazy: keeps dast --help fast

    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    overrides = timm_overrides(args.timm) if args.timm else None
    common = dict(
        quick=args.quick, progress=not args.no_progress, workers=args.workers, shift=args.shift, overrides=overrides
    )
    if args.seeds is not None:
        seeds = _seeds(args.seeds)
        report = run_demo_seeds(args.out, seeds, **common)
        print(format_seeds(report["summary"]))
        print(
            f"seeds {', '.join(map(str, seeds))}, {report['seconds']:.0f} s; report: {args.out}/report.json, "
            f"figure: {args.out}/seeds.png; each seed in {args.out}/seed<S>/"
        )
        return 0
    report = run_demo(args.out, seed=args.seed, **common)
    print(format_report(report))
    print(
        f"seed {report['seed']}, {report['seconds']:.0f} s; report: {args.out}/report.json, figures: "
        + ", ".join(f"{args.out}/{f}" for f in report["figures"])
    )
    return 0
