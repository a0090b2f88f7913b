"""``dast check-data``: list every problem of a dataset on disk."""

from __future__ import annotations

import argparse
from typing import Any

from dast.commands._common import add_progress_argument, examples, existing_file
from dast.config import DatasetConfig
from dast.data.check import scan_dataset
from dast.data.labels import read_class_file
from dast.errors import UserError


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Read every image and label of a dataset and print one line per problem: missing folders, "
        "images without labels and labels without images, unreadable files, wrong label encodings, "
        "label values outside the dataset's id range and image/label size mismatches. "
        "Exits 0 when clean, 1 when problems were found.",
        epilog=examples(
            "dast check-data --dataset folder --root my_renders",
            "dast check-data --dataset folder --root my_camera --no-labels   # an unlabelled target",
            "dast check-data --dataset cityscapes --root data/Cityscapes --split val",
        ),
    )
    p.add_argument("--dataset", required=True, choices=["gta5", "synthia", "cityscapes", "folder"])
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--split", default="train", help="split (Cityscapes; default: train)")
    p.add_argument("--list", dest="list_file", default=None, help="check only the images this text file names")
    p.add_argument("--images", default="images", help="folder datasets: image sub-folder (default: images)")
    p.add_argument("--labels", default="labels", help="folder datasets: label sub-folder (default: labels)")
    p.add_argument("--no-labels", action="store_true", help="folder datasets: there is no label folder")
    p.add_argument(
        "--classes", default=None, help="folder datasets: YAML class list (default: ROOT/classes.yaml when present)"
    )
    p.add_argument("--num-classes", type=int, default=None, help="folder datasets: number of classes")
    p.add_argument("--workers", type=int, default=None, help="reader threads (default: up to 8)")
    add_progress_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    num_classes = args.num_classes
    if args.classes:
        num_classes = read_class_file(existing_file(args.classes, "class list")).num_classes
    if num_classes is not None and not 1 <= num_classes <= 255:
        raise UserError(f"--num-classes must be in 1..255, got {num_classes}")
    if args.list_file is not None:
        existing_file(args.list_file, "list file")
    dataset = DatasetConfig(
        kind=args.dataset,
        root=args.root,
        split=args.split,
        list_file=args.list_file,
        images=args.images,
        labels=None if args.no_labels else args.labels,
    )
    result = scan_dataset(
        dataset, num_classes, class_file=args.classes, workers=args.workers, progress=not args.no_progress
    )
    for line in result.problems:
        print(line)
    what = f"{result.num_images} images, {result.num_labels} labels checked in {args.root}"
    if result.problems:
        print(f"{len(result.problems)} problem(s) found ({what})")
        return 1
    print(f"ok: no problems ({what})")
    return 0
