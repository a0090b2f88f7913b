"""``dast report DEMO_OUT``: one HTML page for a folder written by ``dast demo --out``.

A demo folder holds ``report.json`` (``{"variants": {name: {"miou", "per_class", ...}}, ...}``),
the figures it names and ``runs/<run>/`` run directories. The page shows the results table
built from whatever variants and fields ``report.json`` holds (none is assumed), embeds the
figures, and links each run's own report, which is written next to it
(``runs/<run>/report.html``) with :func:`dast.reporting.page.write_report`.

Only ``report.json`` itself must be readable; a missing figure or run directory, or a run
whose report cannot be made, becomes a note on the page.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dast import __version__
from dast.atomic import write_text
from dast.errors import UserError
from dast.reporting.page import CSS, _e, _note, _table, img_tag, sig, write_report
from dast.reporting.rundir import read_run
from dast.rundir import DEMO_REPORT, DemoDir, RunDir

REPORT_JSON = DEMO_REPORT
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# report.json keys with a section of their own; any other key is shown generically
_KNOWN_KEYS = ("variants", "figures", "runs", "train_seconds", "pseudo_labels", "mechanisms", "summary", "per_seed")
# per-variant keys with a column of their own, in this order
_VARIANT_KEYS = ("miou", "snapshot", "last", "gap_recovered", "per_class")


def _mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else an empty one (report.json fields may be absent or odd)."""
    return value if isinstance(value, dict) else {}


def is_demo_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like a ``dast demo`` output folder (``report.json``, no ``config.yaml``)."""
    root = Path(path)
    return (root / REPORT_JSON).is_file() and not RunDir(root).config.is_file()


@dataclass
class RunLink:
    """One run directory of the demo and the variants whose checkpoint lies in it."""

    name: str
    folder: Path
    variants: list[str] = field(default_factory=list)
    report: Path | None = None
    status: str = "missing"
    miou: float | None = None
    note: str | None = None


@dataclass
class SeedLink:
    """One seed's folder of a several-seed demo (``dast demo --seeds``) and its own page."""

    seed: str
    folder: Path
    report: Path | None = None
    note: str | None = None


@dataclass
class DemoContents:
    """What the demo page shows, read from a demo folder."""

    root: Path
    report: dict[str, Any]
    figures: list[tuple[str, bytes | None]]
    runs: list[RunLink]
    seeds: list[SeedLink] = field(default_factory=list)


def read_report_json(root: Path) -> dict[str, Any]:
    """``root/report.json`` as a dict with a ``variants`` mapping; anything else is a UserError."""
    path = root / REPORT_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read as JSON ({type(exc).__name__}); is {root} a dast demo folder?") from exc
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
        raise UserError(
            f"{root} is not a dast demo folder: {path.name} has no 'variants' mapping (made by `dast demo --out`)"
        )
    return data


def _figures(root: Path, report: dict[str, Any]) -> list[tuple[str, bytes | None]]:
    names = report.get("figures")
    if not isinstance(names, list):
        names = sorted(p.name for p in root.glob("*.png"))
    out: list[tuple[str, bytes | None]] = []
    for name in names:
        path = root / str(name)
        try:
            data = path.read_bytes() if path.is_file() else None
        except OSError:
            data = None
        out.append((str(name), data if data is not None and data.startswith(PNG_MAGIC) else None))
    return out


def _run_folder(root: Path, checkpoint: str) -> Path | None:
    """The run directory (the nearest folder inside ``root`` with a config.yaml) a checkpoint
    path lies in; ``root`` is resolved, and so is the answer."""
    for parent in (root / checkpoint).resolve().parents:
        if root not in parent.parents:
            return None
        if RunDir(parent).config.is_file():
            return parent
    return None


def find_runs(root: Path, report: dict[str, Any]) -> list[RunLink]:
    """Every run directory the report names (``runs``: variant -> checkpoint path) plus any
    other ``runs/*/`` folder with a ``config.yaml``, in the report's order."""
    root = root.resolve()
    links: dict[Path, RunLink] = {}
    named = _mapping(report.get("runs"))
    for variant, checkpoint in named.items():
        folder = _run_folder(root, str(checkpoint))
        if folder is None:  # the run directory is gone: still list the variant
            missing = (root / str(checkpoint)).resolve()
            link = links.setdefault(
                missing, RunLink(name=str(checkpoint), folder=missing, note=f"no run directory holds {checkpoint}")
            )
        else:
            link = links.setdefault(folder, RunLink(name=folder.relative_to(root).as_posix(), folder=folder))
        link.variants.append(str(variant))
    runs_dir = DemoDir(root).runs
    if runs_dir.is_dir():
        for folder in sorted(p for p in runs_dir.iterdir() if RunDir(p).config.is_file()):
            links.setdefault(folder, RunLink(name=folder.relative_to(root).as_posix(), folder=folder))
    return list(links.values())


def find_seeds(root: Path, report: dict[str, Any]) -> list[SeedLink]:
    """The seed folders a several-seed report names (``per_seed``: seed -> its report.json)."""
    root = root.resolve()
    links = []
    for seed, path in _mapping(report.get("per_seed")).items():
        folder = (root / str(path)).parent.resolve()
        shown = Path(str(path)).parent.as_posix()
        if folder == root or root not in folder.parents:
            note: str | None = f"{shown}/ is not a seed folder inside the demo folder"
        elif not is_demo_folder(folder):
            note = f"{shown}/ holds no demo report"
        else:
            note = None
        links.append(SeedLink(seed=str(seed), folder=folder, note=note))
    return links


def write_run_reports(runs: list[RunLink], samples: int, device: torch.device | str) -> None:
    """Write ``report.html`` in each run directory; a failure becomes the run's note."""
    for link in runs:
        if link.note is not None:
            continue
        try:
            run = read_run(link.folder)
            link.status = "complete" if run.finished else "not finished"
            link.miou = run.metrics.get("miou") if run.metrics is not None else None
            link.report = write_report(link.folder, samples=samples, device=device)
        except UserError as exc:
            link.status = "unreadable"
            link.note = f"no report: {exc}"


# ------------------------------------------------------------------------------ sections


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _cell(value: Any) -> str:
    """A table cell: numbers to 3 significant digits, text escaped, None a dash."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "&ndash;" if value is None else _e(value)
    return sig(value)


def results_html(report: dict[str, Any]) -> str:
    """The results table: a row per variant (in the report's order, whatever their names),
    mIoU, gap recovered, any other scalar field, then the per-class IoU."""
    variants = {str(k): v for k, v in report["variants"].items() if isinstance(v, dict)}
    if not variants:
        return _note("report.json lists no variants.", "warn")
    extra: list[str] = []
    classes: list[str] = []
    for v in variants.values():
        extra += [k for k, x in v.items() if k not in _VARIANT_KEYS and k not in extra and _scalar(x)]
        per_class = v.get("per_class")
        if isinstance(per_class, dict):
            classes += [str(c) for c in per_class if str(c) not in classes]
    extra_titles = [_title(k) for k in extra]
    head = [
        "variant",
        "<b>mIoU</b> (reported snapshot)",
        "snapshot",
        "mIoU at the last step",
        "gap recovered",
        *extra_titles,
        *[_e(c) for c in classes],
    ]
    rows = []
    for name, v in variants.items():
        gap = v.get("gap_recovered")
        per_class = _mapping(v.get("per_class"))
        rows.append(
            [
                _e(name),
                f"<b>{_cell(v.get('miou'))}</b>",
                _cell(v.get("snapshot")),
                _cell(_mapping(v.get("last")).get("miou")),
                f"{gap:.0f}%" if isinstance(gap, (int, float)) and not isinstance(gap, bool) else "&ndash;",
                *[_cell(v.get(k)) for k in extra],
                *[_cell(per_class.get(c)) for c in classes],
            ]
        )
    intro = (
        "<p>mIoU and per-class IoU (%) on the demo's target val images. Each method is reported at the "
        "snapshot it selects without target labels (the label-free FDA score; <i>snapshot</i> says which), "
        "the oracle at its last step (it is the ceiling, not a method); <i>mIoU at the last step</i> is the "
        "stage's final step for every variant. <i>gap recovered</i> is the share of the source-only &rarr; "
        "oracle mIoU gap a variant closes.</p>"
    )
    return intro + _table(head, rows, left=3)


def _mean_std(mean: Any, std: Any) -> str:
    return f"{_cell(mean)} &plusmn; {_cell(std)}" if isinstance(mean, (int, float)) else "&ndash;"


def seeds_html(report: dict[str, Any], seeds: list[SeedLink], page: Path) -> str:
    """A several-seed demo: mean +- std, last step, per seed, the paired differences against
    each control, and a link to every seed's own page."""
    summary = _mapping(report.get("summary"))
    methods = _mapping(summary.get("methods"))
    names = [str(s) for s in summary.get("seeds", [])] if isinstance(summary.get("seeds"), list) else []
    paired = _mapping(summary.get("paired"))
    controls = list(dict.fromkeys(c for p in paired.values() for c in _mapping(p)))
    head = ["method", "mean &plusmn; std", "last step", *[f"seed {_e(s)}" for s in names]]
    head += [_e(c.replace("_", " ")) + " (seeds higher)" for c in controls]
    rows = []
    for method, e in methods.items():
        e = _mapping(e)
        values = e.get("per_seed")
        per_seed: list[Any] = values if isinstance(values, list) else []
        row = [_e(method), _mean_std(e.get("mean"), e.get("std")), _mean_std(e.get("last_mean"), e.get("last_std"))]
        row += [_cell(per_seed[i]) if i < len(per_seed) else "&ndash;" for i in range(len(names))]
        for c in controls:
            d = _mapping(_mapping(paired.get(method)).get(c))
            row.append(f"{d['mean']:+.1f} ({d.get('positive')}/{len(names)})" if "mean" in d else "")
        rows.append(row)
    parts = [
        "<p>mIoU (%) at the snapshots each method selects without target labels, and at the last step; "
        "<i>vs X</i>: the mean of the per-seed differences, with the number of seeds on which the "
        "method is higher.</p>",
        _table(head, rows) if rows else _note("report.json has no several-seed summary.", "warn"),
    ]
    items = []
    for link in seeds:
        if link.report is not None:
            href = Path(os.path.relpath(link.report, page.parent)).as_posix()
            items.append(f'<li>seed {_e(link.seed)}: <a href="{_e(href)}">{_e(href)}</a></li>')
        else:
            items.append(f"<li>seed {_e(link.seed)}: {_e(link.note or 'no page')}</li>")
    if items:
        title = "<h3>Each seed's page (its table, mechanisms, figures and runs)</h3>"
        parts.append(title + "<ul>" + "".join(items) + "</ul>")
    return "".join(parts)


def _title(key: str) -> str:
    return _e(str(key).replace("_", " "))


def _list_html(values: list[Any]) -> str:
    """A list: numbers and text as one row, anything deeper item by item."""
    if all(_scalar(x) for x in values):
        return "<p>" + ", ".join(_cell(x) for x in values) + "</p>" if values else "<p>(none)</p>"
    return "".join(f"<h4>{i}</h4>{_value_html(x)}" for i, x in enumerate(values))


def _value_html(value: Any) -> str:
    """Any report.json value as HTML tables and lists (never a JSON dump)."""
    if isinstance(value, dict):
        return _mapping_html(value)
    if isinstance(value, list):
        return _list_html(value)
    return f"<p>{_cell(value)}</p>"


def _records_html(records: dict[str, dict[str, Any]]) -> str:
    """A dict of dicts (D and C, or one entry per rule) as tables with a row per key: one for
    their numbers and text, one per mapping of numbers they share; anything else below."""
    scalar_cols = list(dict.fromkeys(c for r in records.values() for c, x in r.items() if _scalar(x)))
    parts = []
    if scalar_cols:
        rows = [[_e(k), *[_cell(r.get(c)) for c in scalar_cols]] for k, r in records.items()]
        parts.append(_table(["", *[_title(c) for c in scalar_cols]], rows))
    nested = list(dict.fromkeys(c for r in records.values() for c, x in r.items() if not _scalar(x)))
    for c in nested:
        values = {k: r.get(c) for k, r in records.items()}
        if all(isinstance(x, dict) and all(_scalar(y) for y in x.values()) for x in values.values()):
            cols = list(dict.fromkeys(k2 for x in values.values() for k2 in _mapping(x)))
            rows = [[_e(k), *[_cell(_mapping(x).get(k2)) for k2 in cols]] for k, x in values.items()]
            parts.append(f"<h4>{_title(c)}</h4>" + _table(["", *[_e(k2) for k2 in cols]], rows))
        else:
            parts.extend(f"<h4>{_title(c)}: {_e(k)}</h4>{_value_html(x)}" for k, x in values.items())
    return "".join(parts)


def _mapping_html(data: dict[str, Any]) -> str:
    """A dict shown generically, numbers to 3 significant digits: its scalars as a list, a
    dict of scalars as a one-row table, a dict of dicts as tables with a row per key, a list
    of numbers as one line, anything else as a titled sub-section."""
    facts = [f"{_title(k)}: <b>{_cell(v)}</b>" for k, v in data.items() if _scalar(v)]
    parts = [f"<p>{', '.join(facts)}</p>"] if facts else []
    for key, value in data.items():
        if _scalar(value):
            continue
        if isinstance(value, dict) and value and all(_scalar(x) for x in value.values()):
            table = _table([_e(k) for k in value], [[_cell(x) for x in value.values()]], left=0)
            parts.append(f"<h3>{_title(key)}</h3>{table}")
        elif isinstance(value, dict) and value and all(isinstance(x, dict) for x in value.values()):
            parts.append(f"<h3>{_title(key)}</h3>{_records_html(value)}")
        else:
            parts.append(f"<h3>{_title(key)}</h3>{_value_html(value)}")
    return "".join(parts)


def mechanisms_html(mechanisms: dict[str, Any]) -> str:
    """What the demo measured of the mechanisms: the attention's AUROC and mean alpha, the
    discriminators' outputs, the round-1 pseudo-label thresholds; the rest generically."""
    parts = []
    att = _mapping(mechanisms.get("attention"))
    if att:
        rows = [
            ["AUROC of alpha on the pixels source-only gets wrong (0.5 = chance)", _cell(att.get("auroc"))],
            ["mean alpha on those pixels", _cell(att.get("mean_attention_on_errors"))],
            ["mean alpha on the other pixels", _cell(att.get("mean_attention_on_correct"))],
            ["source-only error rate", _cell(att.get("source_only_error_rate"))],
            ["pixels", _cell(att.get("pixels"))],
        ]
        parts.append("<h3>Discriminator attention (DA's alpha)</h3>" + _table(["", "value"], rows))
    discs = _mapping(mechanisms.get("discriminators"))
    if discs:
        rows = [
            [_e(name), _cell(d.get("source")), _cell(d.get("target")), _cell(d.get("gap"))]
            for name, d in ((k, _mapping(v)) for k, v in discs.items())
        ]
        parts.append(
            "<h3>Discriminators: mean output (least squares labels: source 0, target 1)</h3>"
            + _table(["", "source", "target", "gap"], rows)
        )
    rest = {k: v for k, v in mechanisms.items() if not (k in ("attention", "discriminators") and isinstance(v, dict))}
    if rest:
        parts.append(_mapping_html(rest))
    return "".join(parts)


def other_fields_html(report: dict[str, Any]) -> str:
    """Sections for report.json fields the page has no special place for (added by later versions)."""
    parts = []
    for key, value in report.items():
        if key in _KNOWN_KEYS or _scalar(value):
            continue
        parts.append(f'<section id="field-{_e(key)}"><h2>{_title(key)}</h2>{_value_html(value)}</section>')
    return "".join(parts)


def figures_html(figures: list[tuple[str, bytes | None]]) -> str:
    if not figures:
        return _note("No figures (report.json names none and the folder holds no PNG).", "warn")
    parts = []
    for name, data in figures:
        if data is None:
            parts.append(f"<h3>{_e(name)}</h3>" + _note(f"{_e(name)} is missing or not a PNG.", "warn"))
        else:
            parts.append(f"<h3>{_e(name)}</h3>{img_tag(data, name, 'fig')}")
    return "".join(parts)


def runs_html(runs: list[RunLink], page: Path, report: dict[str, Any], seeds: bool = False) -> str:
    if not runs:
        if seeds:
            return "<p>The run directories are in the seed folders; each seed's page links them.</p>"
        return _note("No run directories (runs/*/config.yaml) found.", "warn")
    seconds = _mapping(report.get("train_seconds"))
    rows = []
    for link in runs:
        if link.report is not None:
            href = Path(os.path.relpath(link.report, page.parent)).as_posix()
            cell = f'<a href="{_e(href)}">{_e(href)}</a>'
        else:
            cell = _e(link.note or "no report")
        rows.append(
            [
                _e(link.name),
                _e(", ".join(link.variants) or "–"),
                _e(link.status),
                _cell(link.miou),
                _cell(seconds.get(link.folder.name)),
                cell,
            ]
        )
    intro = (
        "<p>Each run directory has its own report (status, curves, sample predictions, pseudo labels), "
        "linked by a path relative to this page: keep the folder together when copying it. "
        "<i>Final model mIoU</i> is the run's own <code>final/metrics.json</code>: the snapshot its "
        "label-free score selected. It can differ from the Results table, which reports each variant at "
        "the snapshot in its <i>snapshot</i> column (the oracle at its last step).</p>"
    )
    head = ["run", "variants", "status", "final model mIoU (selected snapshot)", "training s", "report"]
    return intro + _table(head, rows, left=3)


def _has_seeds(contents: DemoContents) -> bool:
    """Whether the folder is a several-seed demo (``dast demo --seeds``)."""
    return bool(contents.seeds) or "summary" in contents.report


def header_html(contents: DemoContents) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [("results", "Results")] + ([("seeds", "Seeds")] if _has_seeds(contents) else [])
    if isinstance(contents.report.get("mechanisms"), dict):
        sections.append(("mechanisms", "Mechanisms"))
    sections += [("figures", "Figures"), ("runs", "Runs"), ("raw", "report.json")]
    facts = [("demo folder", _e(contents.root.resolve()))]
    facts += [(_e(k), _cell(v)) for k, v in contents.report.items() if _scalar(v)]
    facts += [("dast", _e(__version__)), ("torch", _e(torch.__version__)), ("generated", _e(now))]
    rows = "".join(f"<tr><th class=l>{k}</th><td class=l>{v}</td></tr>" for k, v in facts)
    nav = "<nav>" + "".join(f'<a href="#{sid}">{title}</a>' for sid, title in sections) + "</nav>"
    return f"<h1>DAST demo report: {_e(contents.root.resolve().name)}</h1>{nav}<table>{rows}</table>"


# ------------------------------------------------------------------------------ the page


def read_demo(demo_dir: str | Path) -> DemoContents:
    """Read a demo folder (report.json, figures, run directories); only report.json must be readable."""
    root = Path(demo_dir)
    if not root.is_dir():
        raise UserError(f"demo folder not found: {root}" if not root.exists() else f"{root} is not a directory")
    report = read_report_json(root)
    return DemoContents(
        root=root,
        report=report,
        figures=_figures(root, report),
        runs=find_runs(root, report),
        seeds=find_seeds(root, report),
    )


def render_demo_page(contents: DemoContents, page: Path) -> str:
    """The demo page as one HTML string; run-report links are relative to ``page``."""
    report = contents.report
    pseudo = report.get("pseudo_labels")
    sections = [("results", "Results", results_html(report))]
    if _has_seeds(contents):
        sections.append(("seeds", "Seeds", seeds_html(report, contents.seeds, page)))
    mechanisms = report.get("mechanisms")
    if isinstance(mechanisms, dict):
        sections.append(("mechanisms", "Mechanisms", mechanisms_html(mechanisms)))
    if isinstance(pseudo, dict):
        sections.append(("pseudo-labels", "Round-1 pseudo labels against the target labels", _mapping_html(pseudo)))
    sections += [
        ("figures", "Figures", figures_html(contents.figures)),
        ("runs", "Runs", runs_html(contents.runs, page, report, seeds=bool(contents.seeds))),
    ]
    body = "".join(f'<section id="{sid}"><h2>{title}</h2>{html}</section>' for sid, title, html in sections)
    body += other_fields_html(report)
    href = Path(os.path.relpath(contents.root.resolve() / REPORT_JSON, page.resolve().parent)).as_posix()
    body += (
        f'<section id="raw"><h2>report.json</h2><p>Every number of this page, as written by dast demo: '
        f'<a href="{_e(href)}">{_e(href)}</a></p></section>'
    )
    title = f"DAST demo report: {contents.root.resolve().name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"{header_html(contents)}{body}</body></html>\n"
    )


def write_demo_report(
    demo_dir: str | Path, out: str | Path | None = None, *, samples: int = 4, device: torch.device | str = "cpu"
) -> tuple[Path, list[RunLink]]:
    """Write every run's ``report.html`` (and, for ``dast demo --seeds``, every seed's page),
    then the demo page (default ``DEMO_DIR/report.html``), each atomically. Returns (the
    page, the runs with their report paths or notes; a seeds folder's runs are its seeds')."""
    contents = read_demo(demo_dir)
    page = Path(out) if out is not None else DemoDir(contents.root).report_html
    write_run_reports(contents.runs, samples, device)
    runs = list(contents.runs)
    for link in contents.seeds:
        if link.note is None:
            try:
                link.report, seed_runs = write_demo_report(link.folder, samples=samples, device=device)
            except UserError as exc:  # e.g. a truncated report.json: the other seeds still get pages
                link.note = f"no page: {exc}"
                continue
            runs += seed_runs
    write_text(page, render_demo_page(contents, page))
    return page, runs
