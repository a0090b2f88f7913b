"""`dast demo`: the whole method on the built-in synthetic domains, on a laptop CPU.

Trains and evaluates five variants on the procedurally generated game-like source and
camera-like target domains (:mod:`dast.data.synthetic`), with the small backbone:

* ``source_only`` — the segmentor on source labels only;
* ``baseline`` — AdaptSegNet single-level: an output-space discriminator with sigmoid BCE;
* ``da`` — discriminator attention: discoverer + corrector + attention (stage 1 of DAST);
* ``dast`` — DA followed by class-balanced self-training (the same run, continued);
* ``oracle`` — the segmentor trained on *target* labels: the ceiling.

Writes ``OUT/report.json``, ``OUT/figure3.png`` (inputs, attention, predictions, ground
truth) and ``OUT/miou_curve.png``; the run directories are under ``OUT/runs/``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dast.atomic import write_json
from dast.config import deep_merge, from_tree

VARIANTS = ("source_only", "baseline", "da", "dast", "oracle")

# The canonical demo config; configs/demo.yaml holds the same values (a test checks).
DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "variant": "paper",
    "model": {"arch": "small", "num_classes": 7, "norm": "unit", "output_stride": 4},
    "source": {"kind": "synthetic", "domain": "source", "count": 300, "size": [128, 64], "shift": "appearance"},
    "target": {"kind": "synthetic", "domain": "target", "count": 300, "size": [128, 64], "with_labels": False,
               "shift": "appearance"},
    "val": {"kind": "synthetic", "domain": "target", "count": 100, "size": [128, 64], "shift": "appearance"},
    "adversarial": {"discoverer": True, "corrector": True, "attention": True, "loss": "lsgan",
                    "lambda_d": 0.01, "lambda_c": 0.01, "lr": 1.0e-4, "corrector_width": 16},
    "train": {"steps": 1000, "poly_steps": 2000, "lr": 0.01, "batch_size": 4, "num_workers": 0,
              "checkpoint_every": 250, "keep_last": 2, "eval_every": 250, "image_every": 250, "log_every": 25},
    "self_training": {"rounds": 1, "steps": 300, "poly_steps": 2000, "portion": 0.5, "lr": 0.002},
    "selection": {"enabled": True, "num_images": 60, "betas": [0.5, 0.9]},
    "runtime": {"device": "cpu"},
}

# --quick: the same pipeline at a fraction of the cost (for tests and a first look)
QUICK: dict[str, Any] = {
    "source": {"count": 64, "size": [96, 48]},
    "target": {"count": 64, "size": [96, 48]},
    "val": {"count": 24, "size": [96, 48]},
    "train": {"steps": 120, "poly_steps": 240, "checkpoint_every": 60, "eval_every": 60, "image_every": 60, "log_every": 20},
    "self_training": {"steps": 40, "poly_steps": 240},
    "selection": {"num_images": 12},
}

NO_ADVERSARY = {"discoverer": False, "corrector": False, "attention": False}


def demo_tree(*, quick: bool = False, seed: int = 0, shift: str = "appearance") -> dict[str, Any]:
    """The demo's DAST config tree for ``seed``, with ``shift`` on its source, target and val sets."""
    from dast.data.synthetic import check_shift

    check_shift(shift)
    base = deep_merge(DEMO_CONFIG, QUICK) if quick else copy.deepcopy(DEMO_CONFIG)
    base["seed"] = int(seed)
    for part in ("source", "target", "val"):
        base[part]["shift"] = shift
    return base


def variant_trees(base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config of each run. ``da`` and ``dast`` share one run (stage 1 and its rounds)."""
    src_only = deep_merge(base, {"adversarial": NO_ADVERSARY, "self_training": {"rounds": 0}})
    baseline = deep_merge(base, {"adversarial": {"discoverer": False, "corrector": True, "attention": False,
                                                 "loss": "bce", "lambda_c": 0.001},
                                 "self_training": {"rounds": 0}})
    oracle = deep_merge(src_only, {"source": {"domain": "target"}})
    return {"source_only": src_only, "baseline": baseline, "dast": copy.deepcopy(base), "oracle": oracle}


def _train(tree: dict[str, Any], run_dir: Path, progress: bool) -> float:
    """Train one variant (resuming a finished or interrupted run); return its seconds."""
    from dast.training.pipeline import train

    t0 = time.time()
    torch.set_num_threads(1)  # tiny networks: one thread per run, runs in parallel instead
    cfg = from_tree(tree, "demo")
    train(cfg, run_dir, resume=(run_dir / "config.yaml").exists(), progress=progress)
    return time.time() - t0


def train_variants(trees: dict[str, dict[str, Any]], runs: Path, workers: int, progress: bool) -> dict[str, float]:
    """Train every variant, ``workers`` runs at a time in separate processes (longest first)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    order = sorted(trees, key=lambda n: ["dast", "baseline", "source_only", "oracle"].index(n) if n in
                   ("dast", "baseline", "source_only", "oracle") else 99)
    seconds: dict[str, float] = {}
    if workers <= 1:
        for name in order:
            if progress:
                print(f"== training {name}", flush=True)
            seconds[name] = _train(trees[name], runs / name, progress)
        return seconds
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train, trees[name], runs / name, False): name for name in order}
        if progress:
            print(f"== training {', '.join(order)} ({workers} at a time)", flush=True)
        for fut in as_completed(futures):
            name = futures[fut]
            seconds[name] = fut.result()
            if progress:
                print(f"   {name} done in {seconds[name]:.0f} s", flush=True)
    return seconds


def evaluate_checkpoint(checkpoint: Path, val: Any) -> tuple[dict[str, Any], Any]:
    """(metrics of the target model on ``val``, the networks) for a checkpoint, on the CPU."""
    from dast.evaluation.evaluate import evaluate_model
    from dast.models.io import load_networks

    nets, _, _ = load_networks(checkpoint, "cpu")
    return evaluate_model(nets.target_model(), val, "cpu", progress=False), nets


def gap_recovered(miou: float, source_only: float, oracle: float) -> float | None:
    """Share of the source-only -> oracle gap a method closes, in percent."""
    gap = oracle - source_only
    if not math.isfinite(gap) or abs(gap) < 1e-9:
        return None
    return 100.0 * (miou - source_only) / gap


def format_report(report: dict[str, Any]) -> str:
    """The per-class table (like the paper's Table 1) with the share of the gap recovered."""
    variants = report["variants"]
    names = list(next(iter(variants.values()))["per_class"])
    width = max(8, max(len(n) for n in names))
    head = f"{'method':<12}" + "".join(f"{n[:width]:>{width + 1}}" for n in names) + f"{'mIoU':>8}{'gap':>8}"
    lines = [head, "-" * len(head)]
    for v in VARIANTS:
        m = variants[v]
        cells = "".join(f"{(m['per_class'][n] if m['per_class'][n] is not None else float('nan')):>{width + 1}.1f}" for n in names)
        gap = m.get("gap_recovered")
        lines.append(f"{v:<12}{cells}{m['miou']:>8.1f}{(f'{gap:.0f}%' if gap is not None else '-'):>8}")
    lines.append("gap = share of the source-only -> oracle mIoU gap that the method recovers")
    pl = report.get("pseudo_labels")
    if pl and pl.get("precision") is not None:
        per_class = ", ".join(f"{k} {v:.0f}%" for k, v in pl["per_class_precision"].items() if v is not None)
        lines.append(f"round-1 pseudo labels: {pl['precision']:.1f}% of the labelled pixels right "
                     f"({pl['labelled_fraction']:.1f}% labelled); per class: {per_class}")
    return "\n".join(lines)


def run_demo(out: str | Path, *, quick: bool = False, seed: int = 0, progress: bool = True,
             workers: int | None = None, shift: str = "appearance") -> dict[str, Any]:
    """Train and evaluate the five variants; write report.json and the figures in ``out``.

    ``workers`` runs (default: one per CPU core, at most 4) train at the same time.
    ``shift`` sets the synthetic domain shift of the source, target and val sets
    (:data:`dast.data.synthetic.SHIFTS`).
    """
    from dast.data.datasets import build_dataset

    t0 = time.time()
    base = demo_tree(quick=quick, seed=seed, shift=shift)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trees = variant_trees(base)
    n = workers if workers is not None else min(4, os.cpu_count() or 1)
    train_seconds = train_variants(trees, out / "runs", n, progress)

    cfg = from_tree(trees["dast"], "demo")
    val = build_dataset(cfg.val, norm=cfg.model.norm, num_classes=cfg.model.num_classes, with_labels=True, seed=cfg.seed + 2)
    checkpoints = {
        "source_only": out / "runs" / "source_only" / "final" / "model.safetensors",
        "baseline": out / "runs" / "baseline" / "final" / "model.safetensors",
        "da": out / "runs" / "dast" / "stage1" / "selected.safetensors",
        "dast": out / "runs" / "dast" / "final" / "model.safetensors",
        "oracle": out / "runs" / "oracle" / "final" / "model.safetensors",
    }
    variants: dict[str, Any] = {}
    nets_by_variant = {}
    for v in VARIANTS:
        metrics, nets = evaluate_checkpoint(checkpoints[v], val)
        nets_by_variant[v] = nets
        variants[v] = {"miou": float(metrics["miou"]), "per_class": metrics["per_class"]}
    lo, hi = variants["source_only"]["miou"], variants["oracle"]["miou"]
    for v in VARIANTS:
        variants[v]["gap_recovered"] = gap_recovered(variants[v]["miou"], lo, hi)
    report: dict[str, Any] = {"variants": variants, "seed": int(seed), "seconds": 0.0, "quick": bool(quick), "workers": n,
              "shift": shift,
              "train_seconds": {k: round(v, 1) for k, v in train_seconds.items()},
              "figures": ["figure3.png", "miou_curve.png"], "runs": {v: str(p.relative_to(out)) for v, p in checkpoints.items()}}
    labels_dir = out / "runs" / "dast" / "round1" / "pseudo_labels"
    if labels_dir.is_dir():  # the synthetic target has labels: how right were the pseudo labels?
        from dast.training.pseudo_labels import pseudo_label_precision

        target = build_dataset(cfg.target, norm=cfg.model.norm, num_classes=cfg.model.num_classes,
                               with_labels=True, seed=cfg.seed + 1)
        report["pseudo_labels"] = pseudo_label_precision(labels_dir, target)
    write_figure3(out / "figure3.png", val, nets_by_variant, rows=4)
    write_miou_curve(out / "miou_curve.png", out / "runs")
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out / "report.json", report)
    return report


def _predict(nets: Any, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    import torch.nn.functional as F

    with torch.no_grad():
        logits, alpha = nets.target_model().eval()(x[None])
    size = tuple(x.shape[-2:])
    pred = F.interpolate(logits, size=size, mode="bilinear", align_corners=True).argmax(1)[0].numpy().astype(np.uint8)
    att = F.interpolate(alpha, size=size, mode="bilinear", align_corners=True)[0, 0].numpy()
    return pred, att


def write_figure3(path: Path, val: Any, nets: dict[str, Any], rows: int = 4) -> None:
    """Like the paper's Figure 3: input, attention (DA), source-only / DA / DAST, ground truth."""
    from dast.inference.visualize import colorize, figure_grid, heatmap

    colors = [tuple(c) for c in val.table.colors]
    grid = []
    for i in range(min(rows, len(val))):
        x = val.prepare_image(i)
        cells = [val.read_image_rgb(i)]
        _, att = _predict(nets["da"], x)
        cells.append(heatmap(np.clip(att, 0.0, 1.0)))
        for v in ("source_only", "da", "dast"):
            cells.append(colorize(_predict(nets[v], x)[0], colors))
        cells.append(colorize(val.read_label_native(i), colors))
        grid.append(cells)
    figure_grid(grid, ["input", "attention (DA)", "source only", "DA", "DAST", "ground truth"], path)


def write_miou_curve(path: Path, runs: Path) -> None:
    """Target-val mIoU against the iteration for every run (DAST continues DA's run)."""
    from matplotlib.figure import Figure

    from dast.atomic import write_with

    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    labels = {"source_only": "source only", "baseline": "baseline (AdaptSegNet)", "dast": "DA -> DAST", "oracle": "oracle"}
    for name, label in labels.items():
        f = runs / name / "curves.json"
        if not f.exists():
            continue
        pts = [(h["global_step"], h["target"]) for h in json.loads(f.read_text()) if h.get("target") is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", markersize=3, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("target val mIoU (%)")
    ax.set_title("dast demo: mIoU on the target domain during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(str(tmp), format="png"))
