"""``dast configs``: list the packaged configs and the paper's number for each row."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from dast.config import PACKAGED_CONFIG_DIR, PaperRow, packaged_config_names, read_paper_row


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="list the packaged configs (one per paper row) with the paper's numbers",
        description="List the configs shipped with dast, one line each: the name to pass to "
        "`--config`, the paper's row and table, and what the paper reports for it (GTA5 -> Cityscapes: "
        "mIoU over 19 classes; SYNTHIA -> Cityscapes: mIoU over 16 classes / mIoU* over 13).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per config instead")
    return p


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
    lines = [json.dumps(r) for r in config_records()] if args.json else format_table(config_records())
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
