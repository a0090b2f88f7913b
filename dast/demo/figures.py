"""The demo's figures: Figure 3 (with a class legend and an attention colour bar), the
target mIoU during training, the discriminators' outputs, the several-seed summary, and the
synthetic domains themselves. Every figure names the seed(s) and the snapshots it shows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dast.atomic import write_with
from dast.contexts import eval_mode
from dast.data.synthetic import SYNTHETIC_CLASSES, generate_scene
from dast.inference.visualize import HEATMAP_CMAP, colorize
from dast.models.io import Networks
from dast.models.target_model import predict_full_res
from dast.rundir import RunDir

FIGURE3_COLUMNS = (
    ("attention", "attention (DA)"),
    ("source_only", "source only"),
    ("baseline", "baseline"),
    ("da", "DA"),
    ("dast", "DAST"),
)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    write_with(path, lambda tmp: fig.savefig(str(tmp), format="png"))


def _predict(nets: Networks, x: Any, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    with eval_mode(*nets.modules()):
        logits, alpha = predict_full_res(nets.target_model(), x[None], size)
    return logits.argmax(1)[0].numpy().astype(np.uint8), alpha[0, 0].numpy()


def write_figure3(
    path: Path, val: Any, nets: dict[str, Networks], *, seed: int, snapshots: dict[str, str], rows: int = 4
) -> None:
    """Like the paper's Figure 3: input, DA's attention, source only / baseline / DA / DAST
    predictions and the ground truth, with a legend of the classes and a colour bar."""
    colors = [tuple(c) for c in val.table.colors]
    n = min(rows, len(val))
    ncols = 2 + len(FIGURE3_COLUMNS)
    h, w = np.asarray(val.read_label_native(0)).shape
    fig = Figure(figsize=(2.2 * ncols, 2.2 * n * h / w + 1.6), dpi=100)
    axes = fig.subplots(n, ncols, squeeze=False)
    heat = None
    for r in range(n):
        label = np.asarray(val.read_label_native(r))
        x = val.prepare_image(r)
        cells: list[tuple[str, Any]] = [("input", val.read_image_rgb(r))]
        for key, title in FIGURE3_COLUMNS:
            pred, att = _predict(nets["da" if key == "attention" else key], x, label.shape)
            cells.append((title, att if key == "attention" else colorize(pred, colors)))
        cells.append(("ground truth", colorize(label, colors)))
        for c, (title, img) in enumerate(cells):
            ax = axes[r][c]
            if title.startswith("attention"):
                heat = ax.imshow(np.clip(img, 0, 1), cmap=HEATMAP_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    handles = [
        Patch(color=(c[0] / 255.0, c[1] / 255.0, c[2] / 255.0), label=name) for name, c in zip(val.table.names, colors)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    if heat is not None:  # the attention column's scale, at the right edge
        cax = fig.add_axes((0.945, 0.16, 0.012, 0.66))
        fig.colorbar(heat, cax=cax, label="attention (DA): |tanh(D(f))|")
    shown = "; ".join(f"{k}: {v}" for k, v in snapshots.items())
    fig.suptitle(f"dast demo, seed {seed}, target val images 0-{n - 1}\nsnapshots: {shown}", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.93, top=0.86, bottom=0.1, wspace=0.04, hspace=0.06)
    _save(fig, path)


def write_miou_curve(
    path: Path, runs: Path, run_names: Sequence[str], *, seed: int, selected: dict[str, tuple[str, int | None]]
) -> None:
    """Target-val mIoU against the iteration for every run (DAST continues DA's run); a ring
    marks the snapshot each method reports (chosen without target labels)."""
    fig = Figure(figsize=(6.8, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name in run_names:
        f = RunDir(runs / name).curves
        if not f.exists():
            continue
        hist = [h for h in json.loads(f.read_text()) if h.get("target") is not None]
        if not hist:
            continue
        (line,) = ax.plot(
            [h["global_step"] for h in hist],
            [h["target"] for h in hist],
            "-o",
            markersize=3,
            label="DA -> DAST" if name == "dast" else name.replace("_", " "),
        )
        for stage, step in [v for k, v in selected.items() if k == name or (name == "dast" and k in ("da", "dast"))]:
            for h in hist:
                if h["stage"] == stage and h["step"] == step:
                    ax.plot(
                        [h["global_step"]],
                        [h["target"]],
                        "o",
                        markersize=9,
                        markerfacecolor="none",
                        markeredgecolor=line.get_color(),
                    )
    ax.set_xlabel("iteration")
    ax.set_ylabel("target val mIoU (%)")
    ax.set_title(f"dast demo, seed {seed}: target mIoU during training (rings: reported snapshots)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def write_discriminator_figure(path: Path, separation: dict[str, Any], *, seed: int) -> None:
    """Mean D and C outputs on source and target images over stage 1 (least squares: source
    -> 0, target -> 1); separated curves mean the discriminator tells the domains apart."""
    series = separation.get("series", {})
    fig = Figure(figsize=(8.0, 3.4), dpi=100)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, net, title in zip(axes, ("D", "C"), ("discoverer D (features)", "corrector C (outputs)")):
        s = series.get(net)
        if s:
            ax.plot(s["steps"], s["source"], label="source images")
            ax.plot(s["steps"], s["target"], label="target images")
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("stage-1 iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean discriminator output")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"dast demo, seed {seed}: DA's discriminators (labels: source 0, target 1)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def write_seeds_figure(path: Path, summary: dict[str, Any], seeds: Sequence[int]) -> None:
    """Mean +- std of every method's mIoU over the seeds, with each seed as a dot."""
    methods = list(summary["methods"])
    fig = Figure(figsize=(1.2 * len(methods) + 1.5, 3.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(methods))
    means = [summary["methods"][m]["mean"] for m in methods]
    stds = [summary["methods"][m]["std"] for m in methods]
    ax.bar(xs, means, yerr=stds, color="#9ecae1", capsize=4)
    for x, m in zip(xs, methods):
        vals = summary["methods"][m]["per_seed"]
        ax.plot(np.full(len(vals), x) + np.linspace(-0.15, 0.15, len(vals)), vals, "k.", markersize=5)
    ax.set_xticks(xs, [m.replace("_", "\n") for m in methods], fontsize=8)
    ax.set_ylabel("target val mIoU (%)")
    ax.set_title(f"dast demo over seeds {', '.join(map(str, seeds))} (reported snapshots; dots: seeds)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def write_domains_figure(
    path: Path, shift: str, *, seed: int = 0, indices: Sequence[int] = (0, 1, 2, 3), size: tuple[int, int] = (128, 64)
) -> None:
    """Scenes ``indices`` of both synthetic domains under ``shift`` with their label maps (one
    label column when the two domains' maps are the same), and a legend of the classes."""
    scenes = {d: [generate_scene(d, i, seed, size, shift) for i in indices] for d in ("source", "target")}
    shared = all(np.array_equal(s[1], t[1]) for s, t in zip(scenes["source"], scenes["target"]))
    columns = (
        ["source", "target", "labels (both)"] if shared else ["source", "source labels", "target", "target labels"]
    )
    colors = [c for _, c in SYNTHETIC_CLASSES]
    w, h = size
    fig = Figure(figsize=(2.6 * len(columns), 2.6 * len(indices) * h / w + 1.2), dpi=100)
    axes = fig.subplots(len(indices), len(columns), squeeze=False)
    for r in range(len(indices)):
        (src, src_label), (tgt, tgt_label) = scenes["source"][r], scenes["target"][r]
        cells = (
            [src, tgt, colorize(src_label, colors)]
            if shared
            else [src, colorize(src_label, colors), tgt, colorize(tgt_label, colors)]
        )
        for c, img in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"scene {indices[r]}", fontsize=8)
    handles = [Patch(color=(c[0] / 255.0, c[1] / 255.0, c[2] / 255.0), label=n) for n, c in SYNTHETIC_CLASSES]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"synthetic demo domains, shift {shift!r}, seed {seed}, {w}x{h}", fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.9, bottom=0.08, wspace=0.03, hspace=0.05)
    _save(fig, path)
