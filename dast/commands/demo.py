"""`dast demo`: the whole method on the built-in synthetic domains (CPU, minutes)."""

from __future__ import annotations

import argparse

from dast.commands._common import add_progress_argument, add_seeds_argument, examples, nonnegative_int, parse_seeds
from dast.data.synthetic import DEMO_SHIFT, SHIFTS
from dast.errors import UserError

# Wall times measured on the project's 2-core VM with nothing else running (README, "The demo";
# `bash benchmarks/demo_times.sh` measures them again).
QUICK_TIME = "about 1 min"
FULL_TIME = "about 10 min"


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        description="Train and compare the DAST variants on generated street scenes, on the CPU: a "
        "game-like labelled source against a photo-textured target (or, with --shift appearance, "
        "a procedural camera-like one). "
        "Writes DIR/report.json and figures; `dast report DIR` renders them as one HTML page.",
        epilog=examples(
            f"dast demo --out demo_quick --quick       # {QUICK_TIME} on 2 CPU cores",
            f"dast demo --out demo_out                 # one seed, {FULL_TIME} on 2 CPU cores",
            "dast demo --out demo5 --seeds 0 1 2 3 4  # mean +- std over seeds (0,1,2,3,4 works too)",
        ),
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a much shorter run ({QUICK_TIME} on a 2-core VM; too short to rank methods)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    add_seeds_argument(
        p,
        None,
        "several seeds (0 1 2 3 4, or 0,1,2,3,4): each in DIR/seed<S>/, then mean +- std and paired "
        "differences in DIR/report.json and DIR/seeds.png",
    )
    p.add_argument(
        "--shift",
        choices=SHIFTS,
        default=DEMO_SHIFT,
        help="what differs between the synthetic source and target: appearance only (a shared layout "
        "distribution: textures, light, colours, optics), appearance and layout (the original "
        "demo domains), or photographic (the shared layout, with the target's surfaces textured "
        "from real photographs; the default: the paper's kind of shift, a synthetic source against a "
        "photographic target)",
    )
    p.add_argument(
        "--timm",
        default=None,
        metavar="NAME",
        help="train every run with this timm CNN as the encoder instead of dast's tiny ResNet "
        "(e.g. resnet10t; random init, ImageNet input normalisation; needs timm, see docs/backbones.md)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs trained at the same time, one process each (default: CPU cores, at most 4)",
    )
    add_progress_argument(p, "no progress bars or heartbeat lines")
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
        seeds = parse_seeds(args.seeds)
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
