"""`dast sweep`: train configs x seeds across the available GPUs (one process per GPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dast.commands._common import add_seeds_argument, add_set_argument, examples, parse_seeds
from dast.errors import UserError
from dast.sweep import plan_jobs, run_sweep


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        description="Schedule `dast train` runs, one per GPU (or CPU slot), resuming finished or interrupted ones.",
        epilog=examples(
            "dast sweep --configs gta5/resnet101/da gta5/resnet101/dast --seeds 0 1 2 --out runs/sweep",
            "dast sweep --configs mine.yaml --seeds 0,1 --gpus cpu --cpu-jobs 2 --out runs/sweep --dry-run",
        ),
    )
    p.add_argument("--configs", nargs="+", required=True, help="config files or packaged config names (`dast configs`)")
    add_seeds_argument(p, ["0"], "seeds, space- or comma-separated (default: 0)")
    p.add_argument("--out", required=True, help="folder for the run directories and logs")
    p.add_argument("--gpus", default="all", help="comma-separated CUDA ids, 'all', or 'cpu' (default: all)")
    p.add_argument("--cpu-jobs", type=int, default=1, help="parallel jobs when running on CPU")
    add_set_argument(p, "override for every job")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    jobs = plan_jobs(args.configs, parse_seeds(args.seeds), out, args.overrides)
    if args.gpus == "cpu" or (args.gpus == "all" and not torch.cuda.is_available()):
        devices = ["cpu"] * max(1, args.cpu_jobs)
    elif args.gpus == "all":
        devices = [str(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [d.strip() for d in args.gpus.split(",") if d.strip()]
        if not devices:
            raise UserError("--gpus names no device")
    if args.dry_run:
        for i, job in enumerate(jobs):
            print(" ".join(job.command(devices[i % len(devices)])))
        return 0
    codes = run_sweep(jobs, devices, out / "logs")
    print(json.dumps(codes))
    return 0 if all(c == 0 for c in codes.values()) else 1
