"""``dast report RUNS_DIR``: one comparison table over every run directory below a folder.

A sweep (``dast sweep --out RUNS``) or a user's ``runs/`` folder holds run directories at
any depth. The page has a row per run (status, method, final mIoU and per-class IoU, to 3
significant digits) and links each run's own report, which is written next to it.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dast import __version__
from dast.atomic import write_text
from dast.errors import UserError
from dast.reporting.page import CSS, _e, _note, _table, sig, write_report
from dast.reporting.rundir import RunContents, read_run
from dast.rundir import REPORT_HTML, RunDir


@dataclass
class RunRow:
    """One run directory of the folder, as the comparison table shows it."""

    name: str  # its path relative to the folder
    folder: Path
    run: RunContents | None = None
    report: Path | None = None
    note: str | None = None


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every run directory (a folder with a ``config.yaml``) below ``root``, sorted by path;
    the folders inside a run directory are not searched."""
    out: list[Path] = []
    for folder, subdirs, files in os.walk(root):
        subdirs.sort()
        if Path(folder) != Path(root) and RunDir(Path(folder)).config.name in files:
            out.append(Path(folder))
            subdirs.clear()
    return sorted(out)


def is_runs_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder (not itself a run directory) with run directories below it."""
    p = Path(path)
    return p.is_dir() and not RunDir(p).config.is_file() and bool(find_run_dirs(p))


def _method(run: RunContents) -> str:
    """The run's method in a few words: backbone, variant, domains, adversarial parts."""
    cfg = run.config
    if cfg is None:
        return "&ndash;"
    adv = cfg.adversarial
    arch = f"timm {cfg.model.timm_name}" if cfg.model.arch == "timm" else cfg.model.arch
    parts = "attention" if adv.attention else ("D + C" if adv.discoverer else ("C" if adv.corrector else "no D or C"))
    return _e(f"{arch}, {cfg.variant}, {cfg.source.kind} -> {cfg.target.kind}, {parts}")


def comparison_html(rows: list[RunRow], page: Path) -> str:
    """The table: a row per run, its final mIoU and per-class IoU (the union of the classes)."""
    classes: list[str] = []
    for r in rows:
        if r.run is not None and r.run.metrics is not None:
            classes += [str(c) for c in r.run.metrics["per_class"] if str(c) not in classes]
    head = ["run", "status", "method", "stage-1 steps", "rounds", "<b>final mIoU</b>", *[_e(c) for c in classes]]
    body = []
    for r in rows:
        link = (
            f'<a href="{_e(Path(os.path.relpath(r.report, page.parent)).as_posix())}">{_e(r.name)}</a>'
            if r.report is not None
            else _e(r.name)
        )
        run = r.run
        if run is None:
            body.append([link, _e(r.note or "unreadable"), "", "", "", "", *[""] * len(classes)])
            continue
        cfg, m = run.config, run.metrics or {}
        per_class = m.get("per_class") or {}
        body.append(
            [
                link,
                _e("complete" if run.finished else "not finished"),
                _method(run),
                _e(cfg.train.steps) if cfg is not None else "&ndash;",
                _e(f"{cfg.self_training.rounds} x {cfg.self_training.steps}") if cfg is not None else "&ndash;",
                f"<b>{sig(m.get('miou'))}</b>",
                *[sig(per_class.get(c)) for c in classes],
            ]
        )
    intro = (
        "<p>Every run directory below this folder. <i>final mIoU</i> and the per-class IoU (%) are each "
        "run's <code>final/metrics.json</code>: its final model on its own labelled val set (a dash: the "
        "run is not finished, or it has no val set). The runs may use different val sets; compare rows "
        "that share one.</p>"
    )
    return intro + _table(head, body, left=3)


def write_runs_report(
    folder: str | Path, out: str | Path | None = None, *, samples: int = 4, device: torch.device | str = "cpu"
) -> tuple[Path, list[RunRow]]:
    """Write every run's ``report.html`` and the comparison page (default
    ``FOLDER/report.html``), each atomically. Returns (the page, the rows)."""
    root = Path(folder)
    found = find_run_dirs(root) if root.is_dir() else []
    if not found:
        raise UserError(f"no run directories (folders with a config.yaml) below {root}")
    page = Path(out) if out is not None else root / REPORT_HTML
    rows = []
    for d in found:
        row = RunRow(name=d.relative_to(root).as_posix(), folder=d)
        try:
            row.run = read_run(d)
            row.report = write_report(d, samples=samples, device=device)
        except UserError as exc:
            row.note = f"no report: {exc}"
        rows.append(row)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = "".join(_note(f"{_e(r.name)}: {_e(r.note)}", "warn") for r in rows if r.note)
    title = f"DAST runs: {root.resolve().name}"
    html = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
        f"<p>{_e(root.resolve())}: {len(rows)} run director{'ies' if len(rows) != 1 else 'y'}; dast "
        f"{_e(__version__)}, torch {_e(torch.__version__)}, generated {_e(now)}.</p>{notes}"
        f'<section id="runs"><h2>Runs</h2>{comparison_html(rows, page)}</section></body></html>\n'
    )
    write_text(page, html)
    return page, rows
