"""Does DAST's discriminator attention still help under online self-training? The online
stage's ablation on the demo, over the seeds of a finished ``dast demo --seeds`` folder.

For every seed ``S`` of ``DEMO`` (``DEMO/seed<S>/``, written by ``dast demo --seeds``), each
row trains the demo's online stage (``dast.demo.config.ONLINE_RUN``: the settings chosen by
the label-free sweep) from a finished stage 1 of that seed's demo runs (its stage-1 folder
is copied, not retrained), changing only what the row names:

* ``from_source_only`` — from the source-only run (no discriminator to keep);
* ``from_baseline`` — from the AdaptSegNet baseline (its output discriminator kept);
* ``from_da`` — from DA with its discriminators and attention kept: the demo's own
  ``dast_online`` run, read from the demo folder, not retrained;
* ``from_da_drop`` — from DA, the adversarial terms dropped (the attention stays);
* ``from_da_no_classmix`` — from DA, without ClassMix (the student sees the plain target);
* ``from_da_rcs`` — from DA, with rare-class sampling of the source (temperature 0.01,
  min_pixels 100 at 128x64);
* ``from_da_masking`` — from DA, with masked image consistency (ratio 0.7, block 64 scaled).

Every row is scored on the target val set at the snapshot its label-free score selects and
at its last step; the table gives mean +- std and the per-seed paired differences against
``from_source_only`` and ``from_da``. Target labels are used for these scores only.

Example (2 cores)::

    dast demo --out demo5 --seeds 0,1,2,3,4
    python benchmarks/online_ablation.py demo5 --work /tmp/online_ablation --out online_ablation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from dast.atomic import write_json
from dast.config import deep_merge
from dast.demo import demo_tree, evaluate_checkpoint, train_runs
from dast.demo.config import online_overrides, run_trees
from dast.demo.runner import datasets
from dast.rundir import ONLINE, DemoDir, RunDir

# row -> (the demo run whose stage 1 it starts from, the change to the online stage)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "from_source_only": ("source_only", {"self_training": {"online": {"adversarial": "drop"}}}),
    "from_baseline": ("baseline", {}),
    "from_da_drop": ("dast", {"self_training": {"online": {"adversarial": "drop"}}}),
    "from_da_no_classmix": ("dast", {"self_training": {"online": {"classmix": False}}}),
    "from_da_rcs": ("dast", {"source": {"rare_class_sampling": {"temperature": 0.01, "min_pixels": 100}}}),
    "from_da_masking": ("dast", {"self_training": {"online": {"masking": {"ratio": 0.7, "block": 64}}}}),
}
DEMO_RUN = "dast_online"  # the from_da row: the demo's own run
PAIRED_WITH = ("from_source_only", "from_da")


def seed_trees(demo: DemoDir, seed: int, rows: list[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The rows' configs for one seed (the demo's trees with the online stage and the row's
    change) and, for each, the demo run whose stage 1 it forks."""
    report = json.loads(demo.report_json.read_text())
    base = demo_tree(quick=bool(report.get("quick")), seed=seed, shift=report.get("shift"))
    trees = run_trees(base)
    online = online_overrides(bool(report.get("quick")))
    chosen = {name: ROWS[name] for name in (rows or list(ROWS))}
    trees_out = {name: deep_merge(deep_merge(trees[run], online), change) for name, (run, change) in chosen.items()}
    return trees_out, {name: run for name, (run, _) in chosen.items()}


def _scores(run: RunDir, val: Any) -> dict[str, Any]:
    stage = run.stage(ONLINE)
    last = stage.latest_checkpoint()
    assert last is not None, f"{run.root} has no online checkpoint"
    return {
        "miou": float(evaluate_checkpoint(stage.selected, val)[0]["miou"]),
        "last": float(evaluate_checkpoint(last, val)[0]["miou"]),
    }


PRIMARY = ("from_source_only", "from_baseline")  # trained first, over every seed: the README's rows


def _train_seed(root: DemoDir, seed: int, rows_wanted: list[str], work: Path, workers: int, progress: bool) -> None:
    demo = root.seed(seed)
    rows, parents = seed_trees(demo, seed, rows_wanted)
    runs = work / f"seed{seed}"
    # the parents are the demo's finished runs: link their folders in as the fork sources
    runs.mkdir(parents=True, exist_ok=True)
    for parent in set(parents.values()):
        link = runs / f"demo_{parent}"
        if not link.exists():
            link.symlink_to((demo.runs / parent).resolve(), target_is_directory=True)
    forks = {name: f"demo_{parent}" for name, parent in parents.items()}
    train_runs(rows, runs, workers, progress, forks=forks)


def _score_seed(root: DemoDir, seed: int, rows: list[str], work: Path) -> dict[str, Any]:
    demo = root.seed(seed)
    trees, _ = seed_trees(demo, seed, rows)
    _, val, _ = datasets(next(iter(trees.values())))
    scores = {name: _scores(RunDir(work / f"seed{seed}" / name), val) for name in rows}
    scores["from_da"] = _scores(demo.run(DEMO_RUN), val)
    return scores


def ablation(
    demo_root: Path, work: Path, workers: int, progress: bool, only: list[str] | None = None, out: Path | None = None
) -> dict[str, Any]:
    """Train the rows (:data:`PRIMARY` first over every seed, then the others), score every
    seed, and write the result to ``out`` after each group of rows (a long run leaves usable
    partial results)."""
    root = DemoDir(demo_root)
    seeds = json.loads(root.report_json.read_text())["seeds"]
    wanted = only or list(ROWS)
    groups = [[r for r in wanted if r in PRIMARY], [r for r in wanted if r not in PRIMARY]]
    done: list[str] = []
    result: dict[str, Any] = {}
    for group in (g for g in groups if g):
        for seed in seeds:
            _train_seed(root, seed, group, work, workers, progress)
        done += group
        per_seed = {str(seed): _score_seed(root, seed, done, work) for seed in seeds}
        result = {"demo": str(demo_root), "seeds": seeds, "per_seed": per_seed, "summary": summarize(per_seed)}
        if out is not None:
            write_json(out, {**result, "table": table(result["summary"], len(seeds))})
    return result


def summarize(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std of each row (selected and last), and paired differences per seed."""
    rows = list(next(iter(per_seed.values())))
    out: dict[str, Any] = {}
    for row in rows:
        vals = [s[row]["miou"] for s in per_seed.values()]
        lasts = [s[row]["last"] for s in per_seed.values()]
        entry: dict[str, Any] = {
            "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "last_mean": statistics.fmean(lasts),
            "per_seed": vals,
        }
        for other in PAIRED_WITH:
            if other != row and other in rows:
                diffs = [s[row]["miou"] - s[other]["miou"] for s in per_seed.values()]
                entry[f"vs_{other}"] = {"mean": statistics.fmean(diffs), "higher": sum(d > 0 for d in diffs)}
        out[row] = entry
    return out


def table(summary: dict[str, Any], n: int) -> str:
    lines = [
        "| row | mean ± std (selected) | last step | vs from_source_only (seeds higher) | vs from_da (seeds higher) |",
        "|---|---|---|---|---|",
    ]
    for row, e in summary.items():
        cells = []
        for other in PAIRED_WITH:
            p = e.get(f"vs_{other}")
            cells.append(f"{p['mean']:+.1f} ({p['higher']}/{n})" if p else "")
        lines.append(f"| {row} | {e['mean']:.1f} ± {e['std']:.1f} | {e['last_mean']:.1f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo", type=Path, help="a finished `dast demo --seeds ...` folder")
    p.add_argument("--work", type=Path, required=True, help="folder for the runs (finished runs are kept)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="train only these rows")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not DemoDir(args.demo).report_json.is_file():
        raise SystemExit(f"error: {args.demo} has no report.json (run `dast demo --seeds ...` first)")
    out = ablation(args.demo, args.work, args.workers, not args.no_progress, args.rows, args.out)
    text = table(out["summary"], len(out["seeds"]))
    print(text)
    if args.out:
        write_json(args.out, {**out, "table": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
