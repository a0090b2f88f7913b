"""`dast train`: stage 1, model selection, self-training rounds and final evaluation."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from dast.commands._common import add_progress_argument, add_set_argument, examples
from dast.config import Config, from_tree, load_config, load_yaml_tree, to_yaml
from dast.errors import NumericalFault, UserError
from dast.progress import is_terminal
from dast.rundir import RunDir


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        description="Train DAST from a YAML config into a run directory. Works under torchrun. "
        "--dry-run checks the config, the data and the output folder, prints the plan and times a few "
        "steps, without writing anything.",
        epilog=examples(
            "dast train --config demo --out runs/demo",
            "dast train --config mine.yaml --out runs/mine --dry-run      # check and time it first",
            "dast train --config gta5/resnet101/dast --out runs/dast --set train.num_workers=8",
            "dast train --resume runs/dast                                 # continue after an interruption",
            "dast train --config gta5/resnet101/dast --out runs/dast --resume auto  # under torchrun --max-restarts",
        ),
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
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check every dataset root, class list, init file and the output folder, print the resolved config "
        "and the plan, time 3 steps and estimate the whole run; writes nothing (exit 1 when a check fails)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_progress_argument(
        p, "no progress bar (on a terminal) and no progress lines (otherwise: a line every 30 s per stage)"
    )
    return p


def _run_dir_and_resume(args: argparse.Namespace) -> tuple[str, bool | str]:
    """The run directory, and the resume mode (False, True or ``"auto"``), from --out and --resume."""
    from dast.training.session import RESUME_AUTO  # noqa: PLC0415 - lazy: keeps dast train --help fast

    run_dir = args.out
    if args.resume == RESUME_AUTO:
        if not run_dir:
            raise UserError("--resume auto needs --out RUN_DIR")
        return run_dir, RESUME_AUTO
    if isinstance(args.resume, str):
        if run_dir and Path(run_dir) != Path(args.resume):
            raise UserError("--resume RUN_DIR and --out name different directories")
        run_dir = args.resume
    if not run_dir and not args.print_config:
        raise UserError("--out RUN_DIR is required (or --resume RUN_DIR)")
    return run_dir, bool(args.resume)


def _run_dir_and_config(args: argparse.Namespace) -> tuple[str, bool | str, Config | None]:
    run_dir, resume = _run_dir_and_resume(args)
    if args.config is None and args.overrides:
        raise UserError("--set needs --config")
    cfg = load_config(args.config, args.overrides) if args.config else None
    return run_dir, resume, cfg


def _stored_config(run_dir: str) -> Config:
    path = RunDir(Path(run_dir)).config
    if not path.is_file():
        raise UserError(f"nothing to resume in {run_dir}: no config.yaml (start it without --resume)")
    return from_tree(load_yaml_tree(path), str(path))


def run(args: argparse.Namespace) -> int:
    run_dir, resume, cfg = _run_dir_and_config(args)
    if args.print_config:
        if cfg is None:
            if not run_dir:
                raise UserError("--print-config needs --config (or --resume RUN_DIR)")
            cfg = _stored_config(run_dir)
        print(to_yaml(cfg), end="")
        return 0
    if args.dry_run:
        return dry_run(cfg, Path(run_dir), bool(resume), args.force, args.device)
    return train_and_report(args, cfg, run_dir, resume)


def train_and_report(args: argparse.Namespace, cfg: Config | None, run_dir: str, resume: bool | str) -> int:
    """Check the data, train, and end with the per-class table and the next commands."""
    from dast.preflight import training_problems  # noqa: PLC0415 - torch: only when training
    from dast.training.loop import TrainingInterrupted  # noqa: PLC0415 - lazy: keeps dast train --help fast
    from dast.training.peers import RankLost  # noqa: PLC0415 - lazy: keeps dast train --help fast
    from dast.training.pipeline import train  # noqa: PLC0415 - lazy: keeps dast train --help fast
    from dast.training.session import RunComplete  # noqa: PLC0415 - lazy: keeps dast train --help fast

    if cfg is not None:  # a new run or a changed one: its data and init file, every problem at once
        problems = training_problems(cfg)
        if problems:
            raise UserError("\n".join(problems))
    progress = not args.no_progress
    terminal = is_terminal(sys.stderr)
    try:
        metrics = train(
            cfg,
            run_dir,
            resume=resume,
            force=args.force,
            device=args.device,
            progress=progress and terminal,  # a bar on a terminal ...
            heartbeat="dast train" if progress and not terminal else None,  # ... plain lines in a log
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
    if os.environ.get("RANK", "0") == "0":
        print(end_of_run(Path(run_dir), metrics, cfg or _stored_config(run_dir)))
    return 0


def end_of_run(run_dir: Path, metrics: dict[str, Any], cfg: Config) -> str:
    """What ``dast train`` prints at the end: the per-class table, the final model and the next commands."""
    from dast.evaluation.metrics import format_table  # noqa: PLC0415 - lazy: keeps dast train --help fast

    paths = RunDir(run_dir)
    lines = [f"finished: {run_dir}"]
    if metrics:
        lines += ["final model on the val set, IoU per class (%):", format_table(metrics)]
    else:
        lines.append("no final metrics: the config has no labelled val set (`val:`)")
    target = cfg.target
    images = (
        str(Path(target.root) / target.images)
        if target.kind == "folder" and target.root
        else "IMAGES"  # the target images of a packaged dataset: a folder of your choice
    )
    lines += [
        f"final model: {paths.final_model}",
        "next:",
        f"  dast predict --checkpoint {paths.final_model} --input {images} --out {run_dir / 'predictions'}",
        f"  dast report {run_dir}",
    ]
    return "\n".join(lines)


def dry_run(cfg: Config | None, run_dir: Path, resume: bool, force: bool, device: str | None) -> int:
    """``--dry-run``: the resolved config, every problem (exit 1), or the plan and the timing (exit 0)."""
    from dast.preflight import dataset_facts, init_problems, output_problems  # noqa: PLC0415 - torch: only here
    from dast.training.dry_run import measure  # noqa: PLC0415 - torch: only here

    if cfg is None:
        cfg = _stored_config(str(run_dir))
    print(f"# the resolved config (what {RunDir(run_dir).config} will hold)")
    print(to_yaml(cfg), end="")
    facts, problems = dataset_facts(cfg)
    problems += init_problems(cfg) + output_problems(run_dir, resume, force)
    print("\ndatasets:")
    for f in facts:
        where = f"{f.root}" if f.root is not None else "generated"
        labels = "with labels" if f.labels else "labels not used"
        classes = f"{f.table.num_classes} classes" if f.table is not None else "no class list"
        print(f"  {f.role:<7} {f.kind:<10} {where}: {f.images} images, {labels}, {classes}")
    if problems:
        for line in problems:
            print(f"problem: {line}")
        print(f"dry run: {len(problems)} problem(s); nothing was timed and nothing was written")
        return 1
    m = measure(cfg, device)
    print(f"\nplan (run directory {run_dir.absolute()}):")
    for s in m.stages:
        pl = f", pseudo labels for {s.pseudo_label_images} target images first" if s.pseudo_label_images else ""
        print(f"  {s.name:<7} {s.steps} steps, {s.evaluations} evaluation(s), {s.checkpoints} checkpoint(s){pl}")
    per_eval = ", ".join(f"{n} {k} images" for k, n in m.eval_images.items() if n)
    if per_eval:
        print(f"  each evaluation: {per_eval}; then the final model on {m.final_eval_images} val images")
    where = f"on this CPU ({m.threads} threads)" if m.device == "cpu" else f"on {m.device}"
    steps = ", ".join(f"{t:.3g}" for t in m.step_seconds)
    print(f"\ntiming {where}: {len(m.step_seconds)} stage-1 steps took {steps} s (median {m.step:.3g} s)")
    parts = m.seconds()
    total = sum(parts.values())
    detail = ", ".join(f"{k} {_duration(v)}" for k, v in parts.items() if v > 0)
    print(f"estimated wall time of the whole run {where}: {_duration(total)} ({detail})")
    print(f"peak memory: {m.peak_bytes / 2**30:.2f} GiB ({m.peak_what})")
    print("dry run: all checks passed; nothing was written")
    return 0


def _duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h`` or ``1.6 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
