"""Plots written into a run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dast.atomic import write_with
from dast.rundir import STAGE1


def plot_selection_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """The paper's Figure 4: synthetic-val mIoU and target-val mIoU over iterations."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - heavy: matplotlib

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = [h["global_step"] for h in history]
    drawn = False
    for key, label, style in (("synthetic", "synthetic val (FDA, label-free)", "-o"), ("target", "target val", "-s")):
        pts = [(x, h[key]) for x, h in zip(xs, history) if key in h]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=3, label=label)
            drawn = True
    starts: dict[str, int] = {}
    for h in history:
        starts.setdefault(h["stage"], h["global_step"] - h["step"])
    for name, x0 in starts.items():
        if name != STAGE1:
            ax.axvline(x0, color="grey", linewidth=0.8, linestyle=":")
            ax.text(x0, ax.get_ylim()[1], name, fontsize=7, va="top")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Model selection: synthetic val vs target val")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(str(tmp), format="png"))
