"""``dast configs``: list the packaged configs and the paper's number for each row (and the
``base/`` building blocks), or print one config fully resolved."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import yaml

from dast.commands._common import add_set_argument, examples
from dast.config import (
    PACKAGED_CONFIG_DIR,
    ConfigError,
    PaperRow,
    apply_overrides,
    from_tree,
    load_yaml_tree,
    packaged_config_names,
    read_paper_row,
    resolve_config_path,
    to_yaml,
)


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="List the configs shipped with dast, one line each: the name to pass to "
        "`--config`, the paper's row and table, and what the paper reports for it (GTA5 -> Cityscapes: "
        "mIoU over 19 classes; SYNTHIA -> Cityscapes: mIoU over 16 classes / mIoU* over 13); then the "
        "base/ building blocks that a config of your own can extend. With NAME (a packaged config or a "
        "file), print that config with every inherited and default value filled in.",
        epilog=examples(
            "dast configs",
            "dast configs gta5/resnet101/dast          # the config, resolved",
            "dast configs mine.yaml --set train.steps=100",
            "dast configs base/common                  # a building block, merged (not runnable alone)",
        ),
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="print this config resolved (a packaged name or a file)")
    add_set_argument(p, "with NAME: override a value before resolving (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per config instead")
    return p


def base_records() -> list[dict[str, str]]:
    """The ``base/`` building blocks: name and the first phrase of the file's opening comment."""
    out = []
    for name in packaged_config_names(include_base=True):
        if not name.startswith("base/"):
            continue
        first = (PACKAGED_CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
        about = first.lstrip("#").strip() if first.startswith("#") else ""
        out.append({"name": name, "about": re.split(r"[:.] ", about)[0].rstrip(".:")})
    return out


def resolved_text(name: str, overrides: list[str]) -> str:
    """A config as YAML with every value explicit; a building block (no source/target) as its
    merged tree, with a comment saying it does not run alone."""
    path = resolve_config_path(name)
    tree = apply_overrides(load_yaml_tree(path), overrides)
    if "source" in tree or "target" in tree:
        cfg = from_tree(tree, str(path))
        return f"# {path}, resolved (every inherited and default value filled in)\n" + to_yaml(cfg)
    if not tree:
        raise ConfigError(f"config {path} is empty")
    return (
        f"# {path}: a building block without source/target datasets (extend it with `extends:`); merged only\n"
        + yaml.safe_dump(tree, sort_keys=False)
    )


def paper_numbers(row: PaperRow | None) -> str:
    """The paper's numbers for a row, as printed by ``dast configs`` ("-" when there are none)."""
    if row is None or (row.miou is None and row.miou_16 is None and row.miou_13 is None):
        return "-"
    if row.miou is not None:
        return f"mIoU {row.miou:.1f}"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return f"mIoU-16 {num(row.miou_16)} / mIoU*-13 {num(row.miou_13)}"


def config_records() -> list[dict[str, Any]]:
    """One record per packaged config (not the ``base/`` building blocks), sorted by name."""
    out = []
    for name in packaged_config_names():
        path = PACKAGED_CONFIG_DIR / f"{name}.yaml"  # the packaged file, even if a local file has its name
        row = read_paper_row(path)
        out.append(
            {
                "name": name,
                "path": str(path),
                "paper": row.model_dump() if row is not None else None,
                "numbers": paper_numbers(row),
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    if args.name is not None:
        lines = resolved_text(args.name, args.overrides).rstrip("\n").splitlines()
    elif args.overrides:
        raise ConfigError("--set needs a config NAME (dast configs NAME --set KEY=VALUE)")
    elif args.json:
        lines = [json.dumps(r) for r in config_records()]
    else:
        lines = format_table(config_records()) + format_bases(base_records())
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:  # `dast configs | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def format_table(records: list[dict[str, Any]]) -> list[str]:
    """The lines ``dast configs`` prints: name, paper row, table(s), numbers (and a note)."""
    width = max(len(r["name"]) for r in records)
    rows = []
    for r in records:
        paper = r["paper"] or {}
        tables = paper.get("tables") or []
        where = ("Table" + ("s " if len(tables) > 1 else " ") + ", ".join(map(str, tables))) if tables else "-"
        note = f"  ({paper['note']})" if paper.get("note") else ""
        rows.append((r["name"], paper.get("row", "-"), where, r["numbers"] + note))
    row_width = max(len(x[1]) for x in rows)
    table_width = max(len(x[2]) for x in rows)
    lines = [
        f"{name:<{width}}  {row:<{row_width}}  {where:<{table_width}}  {numbers}".rstrip()
        for name, row, where, numbers in rows
    ]
    lines.append(
        "use a name with --config (e.g. `dast train --config gta5/resnet101/dast --out RUN`); a file path works too"
    )
    return lines


def format_bases(records: list[dict[str, str]]) -> list[str]:
    """The lines for the ``base/`` building blocks (``extends: base/common`` in a config of your own)."""
    if not records:
        return []
    width = max(len(r["name"]) for r in records)
    lines = ["", "building blocks for `extends:` in a config of your own (not runnable alone):"]
    lines += [f"{r['name']:<{width}}  {r['about']}".rstrip() for r in records]
    lines.append("`dast configs NAME` prints any of them resolved")
    return lines
