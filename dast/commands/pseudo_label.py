"""``dast pseudo-label``: class-balanced pseudo labels for the target training set."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from dast.atomic import TMP_MARK
from dast.checkpoint import read_meta
from dast.commands._common import (
    add_amp_argument,
    add_device_argument,
    add_progress_argument,
    add_set_argument,
    checkpoint_file,
    examples,
    resolve_device,
)
from dast.config import load_config, resolve_config_path
from dast.contexts import amp_dtype
from dast.data import datasets
from dast.errors import CheckpointError, UserError
from dast.execution import Execution
from dast.models.io import load_networks


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Run the target model over the target training images of a config, pick per-class "
        "confidence thresholds (the portion q of each class's predicted pixels) and write "
        "DIR/<name>.png (trainIds, 255 ignore), DIR/preview/*_color.png, DIR/stats.json and "
        "DIR/COMPLETE. Defaults come from the config's self_training section.",
        epilog=examples(
            "dast pseudo-label --checkpoint runs/dast/stage1/selected.safetensors --config gta5/resnet101/dast "
            "--out pl/",
            "dast pseudo-label --checkpoint runs/mine --config mine.yaml --out pl/ --portion 0.4",
        ),
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="dast model checkpoint")
    p.add_argument(
        "--config",
        required=True,
        metavar="CONFIG",
        help="YAML config file or packaged config name (`dast configs`) whose 'target' dataset is labelled",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (cleared if it holds an earlier set)")
    add_set_argument(p)
    p.add_argument(
        "--portion", type=float, metavar="Q", default=None, help="portion q per class (default: self_training.portion)"
    )
    p.add_argument(
        "--cap", type=float, metavar="T", default=None, help="upper bound of a threshold (default: self_training.cap)"
    )
    p.add_argument(
        "--mode",
        choices=["histogram", "exact-reference"],
        default=None,
        help="threshold estimation (default: self_training.mode)",
    )
    p.add_argument(
        "--rule",
        choices=["ratio", "threshold"],
        default=None,
        help="labelling rule: ratio = argmax(p/t), released; threshold = argmax p kept where "
        "p >= t_c (default: self_training.rule)",
    )
    p.add_argument("--bins", type=int, metavar="N", default=None, help="histogram bins (default: self_training.bins)")
    p.add_argument(
        "--subsample",
        type=int,
        metavar="S",
        default=None,
        help="keep every N-th pixel per image per class (default: self_training.subsample)",
    )
    p.add_argument("--batch-size", type=int, metavar="B", default=1, help="images per forward pass (default 1)")
    p.add_argument(
        "--workers",
        "--num-workers",
        dest="num_workers",
        type=int,
        metavar="N",
        default=None,
        help="data-loading worker processes (default: train.num_workers)",
    )
    add_amp_argument(p, "autocast dtype (default none: float32, as released)")
    p.add_argument(
        "--preview-count", type=int, metavar="N", default=None, help="colour previews to write (default: config)"
    )
    add_progress_argument(p)
    add_device_argument(p)
    return p


def check_output_folder(out: Path) -> None:
    """``out`` must be absent, empty or an earlier pseudo-label set (which is replaced)."""
    from dast.training.pseudo_labels import MARKER_NAME  # noqa: PLC0415 - lazy: keeps dast --help fast

    if out.exists() and not out.is_dir():
        raise UserError(f"pseudo-label output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_NAME).is_file():
        raise UserError(f"refusing to replace {out}: it is not empty and holds no pseudo-label set (no {MARKER_NAME})")


def check_model_matches(ckpt: Path, cfg_path: Path, arch: str, num_classes: int) -> None:
    """The config's model must be the checkpoint's (its classes are what the labels mean)."""
    spec = read_meta(ckpt).get("model", {})
    for key, want in (("arch", arch), ("num_classes", num_classes)):
        if key in spec and spec[key] != want:
            raise CheckpointError(
                f"checkpoint {ckpt} is for {key}={spec[key]!r}, but config {cfg_path} has model.{key}={want!r}"
            )


def replace_folder(new: Path, out: Path) -> None:
    """Move the finished set ``new`` to ``out``, replacing an earlier set there."""
    old = out.with_name(f"{out.name}{TMP_MARK}old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from dast.training.pseudo_labels import generate_pseudo_labels  # noqa: PLC0415 - lazy: keeps dast --help fast

    cfg_path = resolve_config_path(args.config)
    ckpt = checkpoint_file(args.checkpoint)
    cfg = load_config(cfg_path, args.overrides)
    st = cfg.self_training
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    overrides = {
        "portion": args.portion,
        "cap": args.cap,
        "estimator": args.mode,
        "rule": args.rule,
        "bins": args.bins,
        "subsample": args.subsample,
        "preview_count": args.preview_count,
    }
    st = st.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if st.bins < 1:
        raise UserError(f"--bins must be >= 1, got {st.bins}")
    if st.subsample < 1:
        raise UserError(f"--subsample must be >= 1, got {st.subsample}")
    if not 0.0 < st.portion <= 1.0:
        raise UserError(f"--portion must be in (0, 1], got {st.portion}")
    num_workers = cfg.train.num_workers if args.num_workers is None else args.num_workers
    if num_workers < 0:
        raise UserError(f"--workers must be >= 0, got {num_workers}")
    device = resolve_device(args.device)

    out = Path(args.out)
    check_output_folder(out)
    check_model_matches(ckpt, cfg_path, cfg.model.arch, cfg.model.num_classes)
    nets, _, _ = load_networks(ckpt, device)
    dataset = datasets.build_dataset(
        cfg.target, norm=nets.spec.norm, num_classes=nets.spec.num_classes, with_labels=False, seed=cfg.seed
    )
    colors = list(nets.spec.class_colors) or None
    if colors is None and cfg.target.classes:
        colors = [c.color for c in cfg.target.classes]
    # written next to OUT and moved into place when complete: a failed run leaves OUT as it was
    staging = out.with_name(f"{out.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        execution = Execution(
            device=device,
            batch_size=args.batch_size,
            amp_dtype=amp_dtype(args.amp),
            num_workers=num_workers,
            progress=not args.no_progress,
        )
        stats = generate_pseudo_labels(
            nets.target_model(),
            dataset,
            staging,
            st,
            execution=execution,
            colors=colors,
            num_classes=nets.spec.num_classes,
        )
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {k: stats[k] for k in ("num_images", "mode", "rule", "portion", "ignored_fraction", "seconds")}
    print(json.dumps({"out": str(args.out), **summary}))
    return 0
