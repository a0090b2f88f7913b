"""How good are the teacher's and the student's pseudo labels during the online stage?

From a finished ``dast demo`` seed folder, trains the demo's ``dast_online`` online stage
again from the same DA stage 1 (forked, with a checkpoint every ``--every`` steps, all
kept; training is deterministic, so this is the demo's own run), then scores every
checkpoint's teacher and student on the labelled target val set:

* ``precision``: share of the labelled pixels whose argmax is right (every pixel labelled);
* ``confident_share`` / ``confident_precision``: the share of pixels whose top probability
  is at least the online stage's threshold, and how many of those are right (what the
  confidence weight of the loss counts);
* per class: the precision of the argmax labels of each predicted class.

Target labels are used here only to describe the run, never to train or choose. Writes
JSON and a figure (``--figure``). Example::

    dast demo --out demo_out
    python benchmarks/online_precision.py demo_out --work /tmp/precision \
        --figure docs/images/online_precision.png --out online_precision.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from dast.atomic import write_json
from dast.config import deep_merge
from dast.data.synthetic import SYNTHETIC_CLASSES
from dast.demo import demo_tree, train_runs
from dast.demo.config import online_overrides, run_trees
from dast.demo.mechanisms import label_scores
from dast.demo.runner import datasets
from dast.models.io import load_networks
from dast.rundir import ONLINE, STAGE1, DemoDir, RunDir
from dast.training.online.recipe import teacher_networks

NAMES = [n for n, _ in SYNTHETIC_CLASSES]


def measure(demo_dir: Path, work: Path, every: int) -> dict[str, Any]:
    demo = DemoDir(demo_dir)
    report = json.loads(demo.report_json.read_text())
    seed, quick = int(report["seed"]), bool(report.get("quick"))
    tree = run_trees(demo_tree(quick=quick, seed=seed, shift=report.get("shift")), online_overrides(quick))[
        "dast_online"
    ]
    tree = deep_merge(tree, {"train": {"checkpoint_every": every, "keep_last": 100_000}})
    work.mkdir(parents=True, exist_ok=True)
    parent = work / "demo_dast"
    if not parent.exists():
        parent.symlink_to((demo.runs / "dast").resolve(), target_is_directory=True)
    train_runs({"online": tree}, work, 1, False, forks={"online": "demo_dast"})
    cfg, val, _ = datasets(tree)
    threshold = cfg.self_training.online.threshold
    run = RunDir(work / "online")
    start, _, _ = load_networks(run.stage(STAGE1).selected)
    first = label_scores(start.target_model(), val, threshold)
    rows = [{"step": 0, "teacher": first, "student": first}]
    for step, path in run.stage(ONLINE).checkpoint_files():
        student, _, _ = load_networks(path)
        rows.append(
            {
                "step": step,
                "teacher": label_scores(teacher_networks(path).target_model(), val, threshold),
                "student": label_scores(student.target_model(), val, threshold),
            }
        )
    return {"demo": str(demo_dir), "seed": seed, "threshold": threshold, "steps": rows}


def figure(result: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(10, 3.8), dpi=100)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = [r["step"] for r in result["steps"]]
    for who, style in (("teacher", "-o"), ("student", "--s")):
        left.plot(steps, [r[who]["precision"] for r in result["steps"]], style, label=f"{who}: all pixels")
        conf = [r[who]["confident_precision"] for r in result["steps"]]
        left.plot(steps, conf, style, alpha=0.55, label=f"{who}: confident pixels")
    left.set_xlabel("online step (0: DA's selected stage 1)")
    left.set_ylabel("pseudo-label precision (%)")
    left.set_title(f"pseudo labels on the target val set (threshold {result['threshold']:g})", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    last, first = result["steps"][-1], result["steps"][0]
    x = range(len(NAMES))
    width = 0.27
    for k, (label, scores) in enumerate(
        (("DA (start)", first["teacher"]), ("teacher (end)", last["teacher"]), ("student (end)", last["student"]))
    ):
        vals = [scores["per_class_precision"].get(n) or 0.0 for n in NAMES]
        right.bar([i + (k - 1) * width for i in x], vals, width, label=label)
    right.set_xticks(list(x), NAMES, rotation=30, fontsize=8)
    right.set_ylabel("precision of the predicted class (%)")
    right.set_title("per class", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle(f"dast demo seed {result['seed']}: the online stage's pseudo labels", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo", type=Path, help="a finished `dast demo` seed folder (with report.json and runs/dast)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--every", type=int, default=100, help="checkpoint (and score) every N online steps")
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.demo, args.work, args.every)
    for r in result["steps"]:
        t, s = r["teacher"], r["student"]
        print(
            f"step {r['step']:>5}: teacher {t['precision']:.1f}% ({t['confident_share']:.0f}% confident, "
            f"{t['confident_precision'] or 0:.1f}% right), student {s['precision']:.1f}%"
        )
    if args.figure:
        figure(result, args.figure)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
