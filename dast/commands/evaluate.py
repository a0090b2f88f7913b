"""``dast evaluate``: mIoU of a checkpoint or of prediction PNGs on a labelled dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dast.atomic import write_json
from dast.commands._common import (
    add_amp_argument,
    add_device_argument,
    add_progress_argument,
    checkpoint_file,
    examples,
    existing_dir,
    existing_file,
    resolve_device,
)
from dast.config import ClassSpec, DatasetConfig
from dast.contexts import amp_dtype
from dast.data.datasets import build_dataset
from dast.data.labels import SYNTHIA_13, SYNTHIA_16, protocols_for, read_class_file, table_for
from dast.errors import UserError
from dast.evaluation.evaluate import evaluate_model, evaluate_predictions
from dast.evaluation.metrics import format_table
from dast.execution import Execution
from dast.models.io import load_networks

CITYSCAPES_EVAL_SIZE = (1024, 512)


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Evaluate a checkpoint (paper protocol: predict at --size, upsample the logits to the "
        "native label size, argmax) or a folder of train-id prediction PNGs named <stem>.png. "
        "Writes OUT/metrics.json and prints the per-class table.",
        epilog=examples(
            "dast evaluate --dataset cityscapes --root data/Cityscapes --checkpoint runs/dast --out eval/",
            "dast evaluate --dataset folder --root my_val --predictions preds/ --out eval/",
        ),
    )
    p.add_argument("--dataset", required=True, choices=["gta5", "synthia", "cityscapes", "folder"])
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--split", default="val", help="split (Cityscapes; default: val)")
    p.add_argument("--list", dest="list_file", default=None, help="text file naming the images to use")
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("W", "H"),
        default=None,
        help="input size for the network (default: the checkpoint's input size for cityscapes/folder, "
        "1024 512 for cityscapes, else native)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a dast model checkpoint, or a finished run directory (its final model)")
    src.add_argument("--predictions", help="a folder of train-id prediction PNGs <name>.png")
    p.add_argument("--out", required=True, help="output folder for metrics.json")
    p.add_argument("--classes", default=None, help="folder datasets: YAML list of {name, color}")
    p.add_argument("--images", default="images", help="folder datasets: image sub-folder (default: images)")
    p.add_argument("--labels", default="labels", help="folder datasets: label sub-folder (default: labels)")
    p.add_argument(
        "--protocols",
        choices=["auto", "synthia", "none"],
        default="auto",
        help="extra mIoU columns: synthia adds the 16- and 13-class mIoU (auto: synthia when "
        "--dataset synthia or the checkpoint was trained from SYNTHIA)",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    add_amp_argument(p)
    add_progress_argument(p)
    add_device_argument(p)
    return p


def _source_kind(meta: dict[str, Any]) -> str | None:
    cfg = meta.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("source"), dict):
        kind = cfg["source"].get("kind")
        return str(kind) if kind else None
    return None


def _protocols(choice: str, dataset_kind: str, source_kind: str | None) -> dict[str, tuple[int, ...]]:
    if choice == "none":
        return {}
    if choice == "synthia" or source_kind == "synthia":
        return {"miou_16": SYNTHIA_16, "miou_13": SYNTHIA_13}
    return protocols_for(dataset_kind)


def _classes(args: argparse.Namespace, names: list[str], colors: list[tuple[int, int, int]]) -> list[ClassSpec] | None:
    if args.dataset != "folder":
        return None
    if args.classes:
        table = read_class_file(existing_file(args.classes, "class list"))
        return [ClassSpec(name=n, color=c) for n, c in zip(table.names, table.colors)]
    if (Path(args.root) / "classes.yaml").is_file() or not names:
        return None
    colors = colors if len(colors) == len(names) else [(0, 0, 0)] * len(names)
    return [ClassSpec(name=n, color=c) for n, c in zip(names, colors)]


def _size(args: argparse.Namespace, spec_size: tuple[int, int] | None) -> tuple[int, int] | None:
    if args.size is not None:
        w, h = args.size
        if w < 1 or h < 1:
            raise UserError(f"--size must be positive, got {w} {h}")
        return (w, h)
    if args.dataset in ("cityscapes", "folder") and spec_size is not None:
        return (spec_size[0], spec_size[1])
    return CITYSCAPES_EVAL_SIZE if args.dataset == "cityscapes" else None


def run(args: argparse.Namespace) -> int:
    existing_dir(args.root, "dataset root")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = Path(args.out)
    if args.checkpoint:
        device = resolve_device(args.device)
        nets, _, meta = load_networks(checkpoint_file(args.checkpoint), device)
        spec = nets.spec
        cfg = DatasetConfig(
            kind=args.dataset,
            root=args.root,
            split=args.split,
            list_file=args.list_file,
            size=_size(args, spec.input_size),
            images=args.images,
            labels=args.labels,
            classes=_classes(args, list(spec.class_names), list(spec.class_colors)),
        )
        _check_class_count(args, cfg, spec.num_classes)
        dataset = build_dataset(cfg, norm=spec.norm, num_classes=spec.num_classes, with_labels=True)
        execution = Execution(
            device=device,
            batch_size=args.batch_size,
            amp_dtype=amp_dtype(args.amp),
            progress=not args.no_progress,
            num_workers=max(0, args.workers),
        )
        metrics = evaluate_model(
            nets.target_model(),
            dataset,
            execution,
            protocols=_protocols(args.protocols, args.dataset, _source_kind(meta)),
        )
    else:
        pred_dir = existing_dir(args.predictions, "prediction folder")
        cfg = DatasetConfig(
            kind=args.dataset,
            root=args.root,
            split=args.split,
            list_file=args.list_file,
            images=args.images,
            labels=args.labels,
            classes=_classes(args, [], []),
        )
        dataset = build_dataset(cfg, norm="unit", num_classes=_num_classes(cfg), with_labels=True)
        metrics = evaluate_predictions(
            dataset, pred_dir, progress=not args.no_progress, protocols=_protocols(args.protocols, args.dataset, None)
        )
    write_json(out / "metrics.json", metrics)
    print(format_table(metrics))
    print(f"wrote {out / 'metrics.json'}")
    return 0


def _check_class_count(args: argparse.Namespace, cfg: DatasetConfig, num_classes: int) -> None:
    """The checkpoint must predict the dataset's classes; say which file disagrees."""
    have = table_for(cfg).num_classes
    if have != num_classes:
        if args.dataset != "folder":
            where = f"the {args.dataset} dataset"
        elif args.classes:
            where = f"class list {args.classes}"
        else:
            where = f"class list {Path(args.root) / 'classes.yaml'}"
        raise UserError(f"checkpoint {args.checkpoint} predicts {num_classes} classes but {where} has {have}")


def _num_classes(cfg: DatasetConfig) -> int:
    return table_for(cfg).num_classes
