"""Curves for the report, drawn with matplotlib's object API (Agg) into PNG bytes."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dast.reporting.rundir import stage_sort_key
from dast.rundir import STAGE1

MAX_POINTS = 2000
GROUP_TITLES = {"loss": "Losses", "lr": "Learning rates", "other": "Discriminator outputs and attention"}
FIRST_PANELS = ("seg", "pseudo_seg", "adv_d", "adv_c", "disc", "total")


def figure_png(fig: Any, dpi: int = 90) -> bytes:
    """Render a matplotlib ``Figure`` to PNG bytes with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - heavy: matplotlib

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # noqa: PLC0415 - heavy: matplotlib

    return Figure(figsize=(width, height), dpi=90)


def split_scalars(
    scalars: Mapping[str, Mapping[int, float]],
) -> dict[str, dict[str, dict[str, list[tuple[int, float]]]]]:
    """``<stage>/<group>/<name>`` keys -> {group: {name: {stage: sorted [(step, value)]}}}.

    ``loss`` and ``lr`` keys keep their group; every other group (discriminator outputs,
    attention statistics) goes to ``other`` under the name ``<group>/<name>``. Keys of
    another shape (``eval/...``, the evaluation scores) are left out: the report draws
    those from ``curves.json``.
    """
    out: dict[str, dict[str, dict[str, list[tuple[int, float]]]]] = {}
    for key, series in scalars.items():
        parts = key.split("/", 2)
        if len(parts) != 3 or parts[0] == "eval":
            continue
        stage, group, name = parts
        if group not in ("loss", "lr"):
            group, name = "other", f"{group}/{name}"
        pts = sorted((int(s), float(v)) for s, v in series.items())
        out.setdefault(group, {}).setdefault(name, {})[stage] = pts
    return out


def group_order(groups: Sequence[str]) -> list[str]:
    """Losses first, then learning rates, then the rest alphabetically."""
    return sorted(groups, key=lambda g: (0 if g == "loss" else 1 if g == "lr" else 2, g))


def panel_order(names: Sequence[str]) -> list[str]:
    """The main losses first (segmentation, pseudo-label, adversarial, total), then the rest."""
    first = {n: i for i, n in enumerate(FIRST_PANELS)}
    return sorted(names, key=lambda n: (first.get(n, len(first)), n))


def bin_means(points: Sequence[tuple[int, float]], limit: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray, int]:
    """At most ``limit`` points: the means of consecutive bins of equal size (x and y).

    Returns (x, y, bin size); the bin size is 1 when nothing was averaged.
    """
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    if len(x) <= limit:
        return x, y, 1
    k = math.ceil(len(x) / limit)
    y = np.where(np.isfinite(y), y, np.nan)
    n = len(x) // k * k
    xs, ys = x[:n].reshape(-1, k).mean(1), y[:n].reshape(-1, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bin stays NaN (a gap)
        ym = np.nanmean(ys, axis=1)
        if n < len(x):
            xs = np.append(xs, x[n:].mean())
            ym = np.append(ym, np.nanmean(y[n:]))
    return xs, ym, k


def stage_colors(stages: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps  # noqa: PLC0415 - heavy: matplotlib

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(sorted(set(stages), key=stage_sort_key))}


def scalar_group_png(group: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], title: str) -> tuple[bytes, int]:
    """One panel per scalar name, one line per stage, over the global step.

    Returns (PNG bytes, the largest number of steps averaged into one plotted point).
    """
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 - heavy: matplotlib

    names = panel_order(list(group))
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = _new_figure(3.3 * ncols, 2.5 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = stage_colors([s for series in group.values() for s in series])
    binned = 1
    for i, name in enumerate(names):
        ax = axes[i // ncols][i % ncols]
        positive = True
        spans: list[float] = []
        for stage in sorted(group[name], key=stage_sort_key):
            x, y, k = bin_means(group[name][stage])
            binned = max(binned, k)
            ax.plot(
                x,
                y,
                "-",
                linewidth=1.0,
                color=colors[stage],
                label=stage,
                marker="o" if len(x) < 30 else None,
                markersize=2.5,
            )
            fin = y[np.isfinite(y)]
            positive = positive and bool(fin.size) and bool((fin > 0).all())
            spans.extend(fin.tolist())
        if positive and spans and max(spans) / max(min(spans), 1e-30) > 1e3:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(len(names), nrows * ncols):
        axes[j // ncols][j % ncols].set_axis_off()
    fig.suptitle(title + (f" (means over {binned} steps)" if binned > 1 else ""), fontsize=10)
    fig.supxlabel("iteration", fontsize=8)
    fig.tight_layout()
    return figure_png(fig), binned


def miou_curves_png(curves: Sequence[Mapping[str, Any]], selected: Mapping[str, int]) -> bytes | None:
    """The paper's Figure 4: label-free synthetic-val mIoU and target-val mIoU over iterations.

    ``selected`` maps a stage to its selected step; those points are starred. None when the
    history holds neither score.
    """
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 - heavy: matplotlib

    fig = _new_figure(7.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn = starred = False
    for key, label, style in (("synthetic", "synthetic val (FDA, label-free)", "-o"), ("target", "target val", "-s")):
        pts = [
            (int(h["global_step"]), float(h[key]))
            for h in curves
            if isinstance(h.get(key), (int, float)) and "global_step" in h
        ]
        if not pts:
            continue
        drawn = True
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=3, label=label)[0]
        marks = [
            (int(h["global_step"]), float(h[key]))
            for h in curves
            if isinstance(h.get(key), (int, float)) and selected.get(str(h.get("stage"))) == h.get("step")
        ]
        if marks:
            ax.plot(
                [m[0] for m in marks],
                [m[1] for m in marks],
                "*",
                markersize=11,
                color=line.get_color(),
                markeredgecolor="black",
                markeredgewidth=0.5,
                label=None if starred else "selected model of a stage",
            )
            starred = True
    if not drawn:
        return None
    starts: dict[str, int] = {}
    for h in curves:
        if "stage" in h and "global_step" in h and "step" in h:
            starts.setdefault(str(h["stage"]), int(h["global_step"]) - int(h["step"]))
    top = ax.get_ylim()[1]
    for name, x0 in starts.items():
        if name != STAGE1:
            ax.axvline(x0, color="grey", linewidth=0.8, linestyle=":")
            ax.text(x0, top, f" {name}", fontsize=7, va="top")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Model selection: synthetic val vs target val")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)
