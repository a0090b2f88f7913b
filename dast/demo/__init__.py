"""`dast demo`: the whole method on the built-in synthetic domains, on a laptop CPU.

Trains the runs of :mod:`dast.demo.config` (source only, its BatchNorm-matched control,
the AdaptSegNet baseline, DA followed by self-training, the oracle), scores every variant
at the snapshot it selects without target labels and at its stage's last step, measures
the mechanisms (:mod:`dast.demo.mechanisms`) and draws the figures
(:mod:`dast.demo.figures`). Several seeds (:func:`run_demo_seeds`) add mean +- std and
per-seed paired differences (:mod:`dast.demo.summary`).

Output (one seed; the layout is :class:`dast.rundir.DemoDir`): ``report.json``,
``figure3.png``, ``miou_curve.png``, ``discriminators.png`` and ``runs/<run>/``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dast.atomic import write_json
from dast.config import from_tree
from dast.demo.config import (
    DEMO_CONFIG,
    FORKS,
    NO_ADVERSARY,
    QUICK,
    RUNS,
    SHIFTS,
    VARIANT_SNAPSHOTS,
    VARIANTS,
    demo_tree,
    online_overrides,
    run_trees,
)
from dast.demo.figures import write_discriminator_figure, write_figure3, write_miou_curve, write_seeds_figure
from dast.demo.mechanisms import attention_auroc, discriminator_separation, online_labels, pseudo_label_report
from dast.demo.runner import (
    datasets,
    default_workers,
    evaluate_checkpoint,
    load,
    progress_line,
    train_runs,
    variant_snapshots,
)
from dast.demo.summary import format_report, format_seeds, gap_recovered, summarize_seeds
from dast.evaluation.evaluate import evaluate_model
from dast.execution import Execution
from dast.models.io import build_networks
from dast.rundir import ONLINE, DemoDir
from dast.training.pseudo_labels import pseudo_label_precision
from dast.training.setup import model_spec_for

FIGURES = ("figure3.png", "miou_curve.png", "discriminators.png")

__all__ = [
    "DEMO_CONFIG",
    "FIGURES",
    "NO_ADVERSARY",
    "QUICK",
    "RUNS",
    "SHIFTS",
    "VARIANTS",
    "demo_tree",
    "evaluate_checkpoint",
    "format_report",
    "format_seeds",
    "gap_recovered",
    "run_demo",
    "run_demo_seeds",
    "run_trees",
    "summarize_seeds",
    "train_runs",
]


def check_runs(trees: dict[str, dict[str, Any]]) -> None:
    """Validate every run's config and build the DAST run's networks once (a missing optional
    package or an impossible model fails with one line, before the demo writes anything)."""
    configs = {name: from_tree(tree, f"demo run {name}") for name, tree in trees.items()}
    build_networks(model_spec_for(configs["dast"]))


def _score(snapshots: dict[str, dict[str, Any]], val: Any, nets_out: dict[str, Any]) -> dict[str, Any]:
    """Target-val metrics of every variant at its selected and last snapshots."""
    variants: dict[str, Any] = {}
    cache: dict[Path, dict[str, Any]] = {}
    for v, snaps in snapshots.items():
        entry: dict[str, Any] = {}
        for which, snap in snaps.items():
            if snap.path not in cache:
                nets = load(snap)
                metrics = evaluate_model(nets.target_model(), val, Execution(progress=False))
                cache[snap.path] = {"miou": float(metrics["miou"]), "per_class": metrics["per_class"]}
                if which == "selected":
                    nets_out[v] = nets
            elif which == "selected":
                nets_out[v] = load(snap)
            scored = {**cache[snap.path], "snapshot": snap.describe(), "selection_score": snap.selection}
            if which == "selected":
                entry.update(scored)
            else:
                entry["last"] = scored
        variants[v] = entry
    lo, hi = variants["source_only"]["miou"], variants["oracle"]["miou"]
    for m in variants.values():
        m["gap_recovered"] = gap_recovered(m["miou"], lo, hi)
    return variants


def run_demo(
    out: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
    shift: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and score every variant for one seed; write report.json and the figures in ``out``.

    ``workers`` runs (default: one per CPU core, at most 4) train at the same time.
    ``overrides`` (a nested mapping) changes the DAST run's config and every run derived from it.
    """
    t0 = time.time()
    demo = DemoDir(Path(out))
    base = demo_tree(quick=quick, seed=seed, shift=shift, overrides=overrides)
    trees = run_trees(base, online_overrides(quick))
    check_runs(trees)  # bad settings fail here, before anything is written
    demo.root.mkdir(parents=True, exist_ok=True)
    n = workers if workers is not None else default_workers()
    already = [name for name in trees if demo.run(name).finished()]  # a rerun over finished runs
    train_seconds = train_runs(trees, demo.runs, n, progress, forks=FORKS)
    progress_line("== scoring the variants and measuring the mechanisms", progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: several threads only add contention (measured 25x slower under load)
    try:
        report = _score_and_draw(demo, trees, seed, progress)
    finally:
        torch.set_num_threads(threads)
    report.update(
        {
            "seed": int(seed),
            "quick": bool(quick),
            "workers": n,
            "shift": shift,
            # seconds of the runs trained by this call; runs finished before it are only listed
            "train_seconds": {k: round(v, 1) for k, v in train_seconds.items() if k not in already},
            "already_trained": already,
        }
    )
    report["seconds"] = round(time.time() - t0, 1)
    write_json(demo.report_json, report)
    return report


def _score_and_draw(demo: DemoDir, trees: dict[str, Any], seed: int, progress: bool) -> dict[str, Any]:
    """The report of a trained demo (variants, mechanisms, round-1 label precision) and its figures."""
    cfg, val, target = datasets(trees["dast"])
    snapshots = variant_snapshots(demo.runs, VARIANT_SNAPSHOTS, cfg.self_training.rounds)
    nets: dict[str, Any] = {}
    variants = _score(snapshots, val, nets)
    st = cfg.self_training
    mechanisms: dict[str, Any] = {
        "attention": attention_auroc(nets["da"], nets["source_only"], val),
        "discriminators": discriminator_separation(demo.run("dast").scalars),
        "pseudo_labels": pseudo_label_report(nets["da"], target, st) if st.rounds else None,
    }
    online_last = demo.run("dast_online").stage(ONLINE).latest_checkpoint()
    if online_last is not None:  # the online stage's teacher and student at its end, on the target val set
        threshold = from_tree(trees["dast_online"], "dast_online").self_training.online.threshold
        mechanisms["online_labels"] = online_labels(online_last, val, threshold)
    report: dict[str, Any] = {
        "variants": variants,
        "seed": int(seed),
        "seconds": 0.0,
        "figures": list(FIGURES),
        "mechanisms": {
            **mechanisms,
            "discriminators": {k: v for k, v in mechanisms["discriminators"].items() if k != "series"},
        },
        "runs": {v: str(s["selected"].path.relative_to(demo.root)) for v, s in snapshots.items()},
    }
    labels_dir = demo.run("dast").round(1).pseudo_labels
    if labels_dir.is_dir():  # the labels round 1 really trained on, scored against the synthetic target labels
        report["pseudo_labels"] = pseudo_label_precision(labels_dir, target)
    shown = {v: snapshots[v]["selected"].describe() for v in ("source_only", "baseline", "da", "dast")}
    write_figure3(demo.figure("figure3.png"), val, nets, seed=seed, snapshots=shown)
    write_miou_curve(
        demo.figure("miou_curve.png"),
        demo.runs,
        RUNS,
        seed=seed,
        selected={v: (s["selected"].stage, s["selected"].step) for v, s in snapshots.items()},
    )
    write_discriminator_figure(demo.figure("discriminators.png"), mechanisms["discriminators"], seed=seed)
    return report


def run_demo_seeds(
    out: str | Path,
    seeds: Sequence[int],
    *,
    quick: bool = False,
    progress: bool = True,
    workers: int | None = None,
    shift: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`run_demo` for every seed (in ``out/seed<S>/``), then the summary in
    ``out/report.json`` and ``out/seeds.png``."""
    t0 = time.time()
    demo = DemoDir(Path(out))
    reports = []
    for s in seeds:
        progress_line(f"== seed {s}", progress)
        reports.append(
            run_demo(
                demo.seed(s).root,
                quick=quick,
                seed=s,
                progress=progress,
                workers=workers,
                shift=shift,
                overrides=overrides,
            )
        )
    summary = summarize_seeds(reports)
    variants = {
        m: {"miou": e["mean"], "std": e["std"], "per_seed": e["per_seed"]} for m, e in summary["methods"].items()
    }
    report = {
        "variants": variants,
        "seeds": list(seeds),
        "summary": summary,
        "quick": bool(quick),
        "shift": shift,
        "per_seed": {str(r["seed"]): str(demo.seed(r["seed"]).report_json.relative_to(demo.root)) for r in reports},
        "figures": ["seeds.png"],
        "seconds": round(time.time() - t0, 1),
    }
    write_seeds_figure(demo.figure("seeds.png"), summary, seeds)
    write_json(demo.report_json, report)
    return report
