"""The self-contained HTML page of ``dast report``: inline CSS, every image a data URI."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from dast import __version__
from dast.atomic import write_text
from dast.errors import UserError
from dast.evaluation.metrics import PROTOCOL_TITLES
from dast.reporting.figures import GROUP_TITLES, group_order, miou_curves_png, scalar_group_png, split_scalars
from dast.reporting.rundir import RunContents, choose_model, class_names, missing_parts, read_run
from dast.reporting.samples import SampleSet, predict_samples
from dast.rundir import FINAL, RunDir

SECTIONS = (
    ("status", "Run status"),
    ("metrics", "Final metrics"),
    ("curves", "mIoU curves"),
    ("training", "Training curves"),
    ("samples", "Sample predictions"),
    ("pseudo-labels", "Pseudo labels"),
    ("config", "Config"),
    ("log", "Log"),
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:1em 2em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em;margin-bottom:.3em}
table{border-collapse:collapse;margin:.4em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.scroll{overflow-x:auto}
.note{background:#eef4fb;border-left:4px solid #4a7fc1;padding:.4em .8em;margin:.5em 0}
.warn{background:#fff4e0;border-left-color:#e09b1a}.ok{background:#e9f6ea;border-left-color:#3c9a46}
.badge{display:inline-block;padding:.05em .5em;border-radius:.6em;font-size:.85em;color:#fff}
.complete{background:#3c9a46}.running{background:#4a7fc1}.started{background:#e09b1a}
.notstarted{background:#999}.notfinished{background:#e09b1a}
img.fig{max-width:100%;height:auto}
.grid td{vertical-align:top;text-align:center;border:none;padding:.2em}
.grid img{width:240px;height:auto;image-rendering:pixelated}
.grid .cap{font-size:.8em;color:#555}
.swatch{display:inline-block;width:.9em;height:.9em;border:1px solid #888;vertical-align:middle;margin:0 .2em 0 .6em}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
nav a{margin-right:.8em}
"""


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI holding ``png``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes, alt: str, cls: str = "") -> str:
    cls_attr = f' class="{cls}"' if cls else ""
    return f'<img{cls_attr} alt="{html.escape(alt)}" src="{data_uri(png)}">'


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "&ndash;"
    return f"{value:.{digits}f}"


def sig(value: Any, digits: int = 3) -> str:
    """A number to ``digits`` significant digits, written without an exponent (0.549, 58.3,
    9.78, 1234); a whole number stays whole; anything else is a dash."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "&ndash;"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    text = f"{value:.{max(0, decimals)}f}"
    if decimals > 0 and len(text.lstrip("-").replace(".", "").lstrip("0")) > digits:  # 9.995 rounded up to 10.00
        text = f"{value:.{max(0, decimals - 1)}f}"
    return text


def _note(text: str, kind: str = "") -> str:
    return f'<div class="note {kind}">{text}</div>'


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """An HTML table; cells are already-escaped HTML; the first ``left`` columns align left."""

    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{v}</{tag}>" for i, v in enumerate(values))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{cells("th", head)}</tr>{body}</table></div>'


def _badge(status: str) -> str:
    return f'<span class="badge {status.replace(" ", "")}">{_e(status)}</span>'


# ------------------------------------------------------------------------------ sections


def header_html(run: RunContents, model_note: str) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cfg = run.config
    facts = [
        ("run directory", _e(run.root.resolve())),
        ("dast", _e(__version__)),
        ("torch", _e(torch.__version__)),
        ("generated", _e(now)),
        ("samples from", model_note),
    ]
    if cfg is not None:
        rounds = cfg.self_training.rounds
        arch = f"timm {cfg.model.timm_name}" if cfg.model.arch == "timm" else cfg.model.arch
        facts.insert(
            1,
            (
                "method",
                _e(
                    f"{arch}, variant {cfg.variant}, {cfg.source.kind} -> {cfg.target.kind}, "
                    f"{cfg.train.steps} stage-1 steps, {rounds} round{'s' if rounds != 1 else ''} "
                    f"of {cfg.self_training.steps} steps"
                ),
            ),
        )
    rows = "".join(f"<tr><th class=l>{k}</th><td class=l>{v}</td></tr>" for k, v in facts)
    if run.finished:
        status = _note("The run is <b>complete</b>.", "ok")
    else:
        items = "".join(f"<li>{_e(m)}</li>" for m in missing_parts(run))
        status = _note(f"<b>This run is not finished.</b> Missing:<ul>{items}</ul>", "warn")
    extra = "".join(_note(_e(n), "warn") for n in run.notes)
    nav = "<nav>" + "".join(f'<a href="#{sid}">{title}</a>' for sid, title in SECTIONS) + "</nav>"
    return f"<h1>DAST run report: {_e(run.root.resolve().name)}</h1>{nav}<table>{rows}</table>{status}{extra}"


def status_html(run: RunContents) -> str:
    rows = []
    for s in run.stages:
        sel = "&ndash;"
        if s.selected_step is not None:
            sel = f"step {_e(s.selected_step)}"
            if s.selected_key is not None:
                sel += f" ({_e(s.selected_key)} = {_num(s.selected_value, 2)})"
        rows.append(
            [
                _e(s.name),
                _badge(s.status),
                _e(s.steps if s.steps is not None else "–"),
                sel,
                _e(s.latest_checkpoint if s.latest_checkpoint is not None else "–"),
            ]
        )
    final = RunDir(run.root).final_model
    rows.append([FINAL, _badge("complete" if final.is_file() else "not started"), "&ndash;", "&ndash;", "&ndash;"])
    overall = "complete" if run.finished else "not finished"
    return f"<p>Run: {_badge(overall)}</p>" + _table(
        ["stage", "status", "steps", "selected", "latest checkpoint"], rows, left=2
    )


def metrics_html(run: RunContents) -> str:
    m = run.metrics
    if m is None:
        why = (
            "the config has no labelled val set"
            if run.config is not None and run.config.val is None
            else "the run is not finished (final/metrics.json is missing)"
        )
        return _note(f"No final metrics yet: {_e(why)}.", "warn")
    head = [_e(n) for n in m["per_class"]]
    vals = [_num(v) for v in m["per_class"].values()]
    for key in ("miou", *[k for k in m if k.startswith("miou_")]):
        if key in m:
            head.append(f"<b>{_e(PROTOCOL_TITLES.get(key, key))}</b>")
            vals.append(f"<b>{_num(m[key])}</b>")
    table = _table(head, [vals], left=0)
    return (
        f"<p>Per-class IoU (%) of the final model on {_e(m.get('num_images', '?'))} images, "
        f"in the paper's column order.</p>{table}"
    )


def curves_html(run: RunContents) -> str:
    if not run.curves:
        return _note("No evaluations yet (curves.json is missing or empty).", "warn")
    selected = {s.name: s.selected_step for s in run.stages if s.selected_step is not None}
    png = miou_curves_png(run.curves, selected)
    parts = (
        [img_tag(png, "mIoU curves", "fig")] if png else [_note("The evaluation history holds no mIoU values.", "warn")]
    )
    keys = sorted(
        {k for h in run.curves for k in h if k not in ("stage", "step", "global_step")},
        key=lambda k: (k != "synthetic", k != "target", k),
    )
    rows = [
        [_e(h.get("stage", "")), _e(h.get("step", "")), _e(h.get("global_step", ""))]
        + [_num(h.get(k), 2) for k in keys]
        for h in run.curves
    ]
    parts.append(
        "<details><summary>Evaluation history</summary>"
        + _table(["stage", "step", "iteration", *[_e(k) for k in keys]], rows)
        + "</details>"
    )
    return "".join(parts)


def training_html(run: RunContents) -> str:
    groups = split_scalars(run.scalars)
    if not groups:
        return _note("No training scalars yet (scalars.jsonl is missing or empty).", "warn")
    parts = []
    for g in group_order(list(groups)):
        title = GROUP_TITLES.get(g, g.capitalize())
        png, _ = scalar_group_png(groups[g], title)
        parts.append(f"<h3>{_e(title)}</h3>{img_tag(png, title, 'fig')}")
    return "".join(parts)


def legend_html(names: Sequence[str], colors: Sequence[Sequence[int]]) -> str:
    return (
        "<p>"
        + "".join(
            f'<span class="swatch" style="background:rgb({c[0]},{c[1]},{c[2]})"></span>{_e(n)}'
            for n, c in zip(names, colors)
        )
        + "</p>"
    )


def samples_html(sset: SampleSet | None, note: str | None) -> str:
    if sset is None:
        return _note(_e(note or "No sample predictions."), "warn")
    cols = ["input", "attention", "prediction"] + (["ground truth"] if sset.has_labels else [])
    rows = []
    for s in sset.samples:
        cells = [
            img_tag(s.image, f"{s.name} input"),
            img_tag(s.attention, f"{s.name} attention"),
            img_tag(s.prediction, f"{s.name} prediction"),
        ]
        if s.ground_truth is not None:
            cells.append(img_tag(s.ground_truth, f"{s.name} ground truth"))
        cap = f"{_e(s.name)}: attention {s.attention_range[0]:.3f}&ndash;{s.attention_range[1]:.3f}"
        if s.pixel_accuracy is not None:
            cap += f", pixel accuracy {s.pixel_accuracy:.1f}%"
        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
            f'<tr><td class="cap" colspan="{len(cols)}">{cap}</td></tr>'
        )
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    intro = (
        f"<p>The first {len(sset.samples)} images of the {_e(sset.dataset)} set. Attention: the "
        "discoverer map |tanh(D(f))| on a fixed 0 (black) to 1 (yellow) scale.</p>"
    )
    if not sset.has_labels:
        intro += _note(f"The {_e(sset.dataset)} set has no labels, so there is no ground-truth column.")
    return (
        intro + legend_html(sset.class_names, sset.class_colors) + f'<table class="grid">{head}{"".join(rows)}</table>'
    )


def pseudo_labels_html(run: RunContents) -> str:
    if not run.rounds:
        return _note("This run has no self-training rounds (self_training.rounds is 0).")
    parts = []
    for rl in run.rounds:
        parts.append(f"<h3>{_e(rl.name)}</h3>")
        if rl.note:
            parts.append(_note(_e(rl.note), "warn"))
        st = rl.stats
        if st is not None:
            ignored = st.get("ignored_fraction")
            ignored_pct = 100.0 * ignored if isinstance(ignored, (int, float)) else None
            facts = [
                f"portion {_num(st.get('portion'), 2)}",
                f"cap {_num(st.get('cap'), 2)}",
                f"mode {_e(st.get('mode', '?'))}",
                f"{_e(st.get('num_images', '?'))} images",
                f"ignored fraction {_num(ignored_pct)}%",
            ]
            parts.append("<p>" + ", ".join(facts) + "</p>")
            thr = st.get("thresholds") or []
            names = class_names(run, len(thr))
            if len(names) != len(thr):
                names = [f"class {i}" for i in range(len(thr))]
            cols = [("predicted_pixels", "predicted px"), ("selected_pixels", "labelled px")]
            rows = []
            for i, name in enumerate(names):
                row = [_e(name), _num(thr[i], 4)]
                for key, _ in cols:
                    vals = st.get(key) or []
                    row.append(_e(vals[i]) if i < len(vals) else "&ndash;")
                rows.append(row)
            parts.append(
                "<details open><summary>Thresholds per class</summary>"
                + _table(["class", "threshold", *[c[1] for c in cols]], rows)
                + "</details>"
            )
        if rl.previews:
            cells = "".join(
                f'<td>{img_tag(data, name)}<div class="cap">{_e(name)}</div></td>' for name, data in rl.previews
            )
            parts.append(f'<table class="grid"><tr>{cells}</tr></table>')
        elif rl.exists:
            parts.append(_note("No preview images in pseudo_labels/preview/."))
    return "".join(parts)


def config_html(run: RunContents) -> str:
    return (
        f"<details><summary>config.yaml (the resolved config of the run)</summary>"
        f"<pre>{_e(run.config_text)}</pre></details>"
    )


def log_html(run: RunContents) -> str:
    if not run.log_tail:
        return _note("No log.txt.")
    return (
        f"<details><summary>The last {len(run.log_tail)} lines of log.txt</summary>"
        f"<pre>{_e(chr(10).join(run.log_tail))}</pre></details>"
    )


# ------------------------------------------------------------------------------ the page


def _samples(run: RunContents, count: int, device: torch.device | str) -> tuple[SampleSet | None, str, str]:
    """(samples or None, why none, which model) for the report."""
    if count <= 0:
        return None, "Sample predictions were not requested (--samples 0).", "&ndash;"
    choice = choose_model(run)
    if choice is None:
        return None, "No model to predict with yet: no stage has written a checkpoint.", "no model yet"
    path, what = choice
    if run.config is None:
        return None, "Samples are skipped: config.yaml does not validate with this dast version.", _e(what)
    try:
        return predict_samples(path, run.config, count, device), "", _e(what)
    except UserError as exc:  # a dataset that moved, a damaged checkpoint: the rest of the page still helps
        return None, f"Samples could not be made: {exc}", _e(what)


def render_report(run_dir: str | Path, *, samples: int = 4, device: torch.device | str = "cpu") -> str:
    """The HTML report of a run directory (finished or not), as one self-contained string."""
    run = read_run(run_dir)
    sset, why, model_note = _samples(run, samples, device)
    bodies = {
        "status": status_html(run),
        "metrics": metrics_html(run),
        "curves": curves_html(run),
        "training": training_html(run),
        "samples": samples_html(sset, why),
        "pseudo-labels": pseudo_labels_html(run),
        "config": config_html(run),
        "log": log_html(run),
    }
    sections = "".join(f'<section id="{sid}"><h2>{title}</h2>{bodies[sid]}</section>' for sid, title in SECTIONS)
    title = f"DAST run report: {run.root.resolve().name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"{header_html(run, model_note)}{sections}</body></html>\n"
    )


def write_report(
    run_dir: str | Path, out: str | Path | None = None, *, samples: int = 4, device: torch.device | str = "cpu"
) -> Path:
    """Render the report and write it atomically (default ``RUN_DIR/report.html``)."""
    path = Path(out) if out is not None else RunDir(Path(run_dir)).report
    page = render_report(run_dir, samples=samples, device=device)
    write_text(path, page)
    return path
