"""``dast predict``: segment target images with a checkpoint and write PNGs (and logits)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from dast.commands._common import (
    add_amp_argument,
    add_device_argument,
    add_progress_argument,
    checkpoint_file,
    examples,
    nonnegative_int,
    positive_int,
    resolve_device,
)
from dast.contexts import amp_dtype
from dast.models.io import load_networks


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Run the target path (segmentor + discoverer attention) on images and write, per image "
        "<stem>: <stem>.png (trainIds at the original resolution), <stem>_color.png, <stem>_overlay.png, "
        "<stem>_attention.png and, with --save-logits, <stem>.npy (float32 C x h x w logits).",
        epilog=examples(
            "dast predict --checkpoint runs/mine/final/model.safetensors --input my_camera/images --out preds/",
            "dast predict --checkpoint runs/mine --input photo.jpg --out preds/ --save-logits   # a run directory",
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="dast checkpoint (.safetensors), or a finished run directory (its final model)",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image files, folders (png/jpg/jpeg/bmp, not recursive) or glob patterns",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--save-logits", action="store_true", help="also write <stem>.npy with the raw logits")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass (default 1)")
    add_device_argument(p)
    p.add_argument(
        "--size",
        type=positive_int,
        nargs=2,
        metavar=("W", "H"),
        help="resize inputs to W x H instead of the checkpoint's input size",
    )
    add_amp_argument(p)
    p.add_argument(
        "--workers",
        type=nonnegative_int,
        default=min(4, os.cpu_count() or 1),
        help="image-reading worker processes (default: up to 4)",
    )
    add_progress_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    from dast.execution import Execution  # noqa: PLC0415 - lazy: keeps dast --help fast
    from dast.inference.predict import expand_inputs, plan_outputs, predict_paths  # noqa: PLC0415 - lazy: keeps dast --help fast

    device = resolve_device(args.device)
    inputs = expand_inputs(args.input)
    out = Path(args.out)
    plans = plan_outputs(inputs, out, args.save_logits)  # refuse name clashes before loading the model
    ckpt = checkpoint_file(args.checkpoint)
    nets, _, _ = load_networks(ckpt, device)
    if args.size is not None:
        nets.spec = dataclasses.replace(nets.spec, input_size=(int(args.size[0]), int(args.size[1])))
    new_files = [f for files in plans for f in files.values() if not f.exists()]
    created = not out.exists()
    try:
        execution = Execution(
            device=device,
            batch_size=args.batch_size,
            amp_dtype=amp_dtype(args.amp),
            progress=not args.no_progress,
            num_workers=args.workers,
        )
        records = predict_paths(nets, inputs, out, execution, save_logits=args.save_logits)
    except BaseException:
        _remove_outputs(new_files, out if created else None)
        raise
    print(f"wrote predictions for {len(records)} image(s) to {out}")
    return 0


def _remove_outputs(files: list[Path], folder: Path | None) -> None:
    """After a failed run: remove the files it wrote (not those that were there before),
    and the output folder if the run created it and it is empty again."""
    for f in files:
        f.unlink(missing_ok=True)
    if folder is not None:
        try:
            folder.rmdir()
        except OSError:
            pass
