"""``dast init-config``: a commented training config for a user's own image folders."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from dast.atomic import write_text
from dast.commands._common import examples, positive_int
from dast.config import from_tree
from dast.config_template import config_template, folder_facts, read_source_classes
from dast.errors import UserError


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        description="Write a commented training config for your folders: SOURCE with images/, labels/ "
        "(class-index PNGs) and classes.yaml; TARGET with images/ only; optionally a labelled VAL folder "
        "of the target domain. The number of classes comes from the source's classes.yaml, the image "
        "sizes from the first image of each folder, and the model is dast's small network, so that a "
        "first run takes minutes on a CPU; the comments say what to change for a real run.",
        epilog=examples(
            "dast init-config --source my_renders --target my_camera --out mine.yaml",
            "dast train --config mine.yaml --out runs/mine --dry-run",
        ),
    )
    p.add_argument("--source", required=True, metavar="DIR", help="labelled source folder (images/, labels/)")
    p.add_argument("--target", required=True, metavar="DIR", help="unlabelled target folder (images/)")
    p.add_argument("--val", metavar="DIR", help="labelled target-domain folder to report the final mIoU on")
    p.add_argument("--classes", metavar="FILE", help="class list (default: SOURCE/classes.yaml)")
    p.add_argument("--out", required=True, metavar="FILE", help="the config file to write (.yaml)")
    p.add_argument("--steps", type=positive_int, default=1000, help="stage-1 steps (default 1000)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (out.is_dir() or not args.force):
        raise UserError(f"{out} exists{' and is a directory' if out.is_dir() else ''}; pass --force to replace it")
    table, classes_path = read_source_classes(args.source, args.classes)
    source = folder_facts(args.source, "source", needs_labels=True)
    target = folder_facts(args.target, "target", needs_labels=False)
    val = folder_facts(args.val, "val", needs_labels=True) if args.val else None
    text = config_template(source, target, val, table, classes_path, steps=args.steps)
    from_tree(yaml.safe_load(text), str(out))  # what is written must load
    write_text(out, text)
    print(f"wrote {out}: {table.num_classes} classes ({', '.join(table.names)}), dast's small network")
    print(f"next: dast train --config {out} --out runs/{out.stem} --dry-run")
    return 0
