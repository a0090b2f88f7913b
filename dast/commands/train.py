"""`dast train`: stage 1, model selection, self-training rounds and final evaluation."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from dast.commands._common import add_set_argument
from dast.config import load_config
from dast.errors import NumericalFault, UserError


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="train a model (stage 1 and self-training rounds)",
        description="Train DAST from a YAML config into a run directory. Works under torchrun.",
    )
    p.add_argument("--config", help="YAML config file, or the name of a packaged config (`dast configs` lists them)")
    p.add_argument("--out", help="run directory")
    add_set_argument(p, "override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue the run in --out (or in RUN_DIR) from its latest complete checkpoint; "
        "'--resume auto' (with --config and --out) starts the run, resumes it, or leaves it when finished, "
        "whichever fits --out: one command for torchrun --max-restarts and requeued jobs",
    )
    p.add_argument("--force", action="store_true", help="resume even if the config differs; reuse a non-empty --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override runtime.device")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from dast.training.loop import TrainingInterrupted  # noqa: PLC0415 - lazy: keeps dast --help fast
    from dast.training.peers import RankLost  # noqa: PLC0415 - lazy: keeps dast --help fast
    from dast.training.pipeline import train  # noqa: PLC0415 - lazy: keeps dast --help fast
    from dast.training.session import RunComplete  # noqa: PLC0415 - lazy: keeps dast --help fast

    run_dir, resume = _run_dir_and_resume(args)
    if args.config is None and args.overrides:
        raise UserError("--set needs --config")
    cfg = load_config(args.config, args.overrides) if args.config else None
    try:
        metrics = train(
            cfg, run_dir, resume=resume, force=args.force, device=args.device, progress=not args.no_progress
        )
    except TrainingInterrupted as exc:
        sys.stderr.write(f"{exc}\n")
        return 128 + exc.signum
    except RunComplete as exc:
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"{exc}\n")
        return 0
    except (NumericalFault, RankLost) as exc:
        # not a user error (exit 1), but a diagnosis, not a crash: one line, details in log.txt
        if getattr(args, "debug", False):
            traceback.print_exc()
        sys.stderr.write(f"error: {exc}\n")
        return 1

    if metrics and os.environ.get("RANK", "0") == "0":
        print(json.dumps({"miou": metrics.get("miou"), "run_dir": str(run_dir)}))
    return 0


def _run_dir_and_resume(args: argparse.Namespace) -> tuple[str, bool | str]:
    """The run directory, and the resume mode (False, True or ``"auto"``), from --out and --resume."""
    from dast.training.session import RESUME_AUTO  # noqa: PLC0415 - lazy: keeps dast --help fast

    run_dir = args.out
    if args.resume == RESUME_AUTO:
        if not run_dir:
            raise UserError("--resume auto needs --out RUN_DIR")
        return run_dir, RESUME_AUTO
    if isinstance(args.resume, str):
        if run_dir and Path(run_dir) != Path(args.resume):
            raise UserError("--resume RUN_DIR and --out name different directories")
        run_dir = args.resume
    if not run_dir:
        raise UserError("--out RUN_DIR is required (or --resume RUN_DIR)")
    return run_dir, bool(args.resume)
