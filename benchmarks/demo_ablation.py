"""Why does DA / DAST rank as it does on the demo? Table 3's ablation on the synthetic domains,
plus the precision of the demo's pseudo labels.

Part 1 (``--seeds``): trains, on the demo config (``dast.demo.DEMO_CONFIG``, on the synthetic
domains of ``--shift``, by default the demo's), the rows of the paper's Table 3 as stage 1
only, and scores each run's last and selected snapshot on the target val set:

* ``baseline`` — AdaptSegNet: output-space discriminator, sigmoid BCE, at the demo baseline's
  lambda (``baseline_lambda(shift)``: the shift's, as the demo's baseline);
* ``mse`` — the same discriminator with the least-squares loss (at DA's lambda);
* ``mse_baseline_lambda`` — the least-squares loss at the baseline's lambda;
* ``mse_2d`` — plus the discoverer on the features (no attention);
* ``da`` — plus the attention f' = f + f*|tanh(D(f))| and the weighted corrector loss.

Part 2 (``--demo-dirs``): for finished ``dast demo`` output folders, the pixel precision of
the round-1 pseudo labels against the synthetic target labels, overall and per class, and
the share of the target pixels they label.

Prints one JSON object; ``--out`` also writes it. Example (2 cores: about 4 min per seed)::

    python benchmarks/demo_ablation.py --seeds 0 1 2 --work /tmp/ablation \
        --demo-dirs /tmp/demo_s0 /tmp/demo_s1 /tmp/demo_s2
    python benchmarks/demo_ablation.py --seeds 0 1 2 --shift photographic --work /tmp/ablation_photo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from dast.atomic import write_json
from dast.config import Config, deep_merge, from_tree, load_yaml_tree, resolve
from dast.data.synthetic import SHIFTS
from dast.demo import NO_ADVERSARY, demo_tree, evaluate_checkpoint, train_runs
from dast.demo.config import baseline_lambda
from dast.demo.runner import datasets
from dast.rundir import STAGE1, DemoDir, RunDir
from dast.training.pseudo_labels import pseudo_label_precision

STAGE1_ONLY = {"self_training": {"rounds": 0}}
ROWS: dict[str, dict[str, Any]] = {
    "baseline": {"adversarial": {**NO_ADVERSARY, "corrector": True, "loss": "bce"}},
    "mse": {"adversarial": {**NO_ADVERSARY, "corrector": True, "loss": "lsgan"}},
    "mse_baseline_lambda": {"adversarial": {**NO_ADVERSARY, "corrector": True, "loss": "lsgan"}},
    "mse_2d": {
        "adversarial": {
            "discoverer": True,
            "corrector": True,
            "attention": False,
            "loss": "lsgan",
            "corrector_weighting": "none",
        }
    },
    "da": {},
}


def row_trees(seed: int, shift: str | None = None) -> dict[str, dict[str, Any]]:
    """The stage-1 config of every Table-3 row for one seed, on the domains of ``shift``
    (None: the demo's own)."""
    base = demo_tree(seed=seed, shift=shift, overrides=STAGE1_ONLY)
    lam = {"adversarial": {"lambda_c": baseline_lambda(base["target"]["shift"])}}  # the baseline's lambda
    with_lambda = {"baseline", "mse_baseline_lambda"}
    return {
        name: deep_merge(deep_merge(base, change), lam if name in with_lambda else {}) for name, change in ROWS.items()
    }


def stage1_config_check(tree: dict[str, Any], run_config: Path, row: str) -> None:
    """A reused demo run must have the row's config in everything but its self-training."""

    def stage1(cfg: Config) -> dict[str, Any]:
        return {k: v for k, v in resolve(cfg).model_dump(mode="json").items() if k != "self_training"}

    want = stage1(from_tree(tree, f"row {row}"))
    have = stage1(from_tree(load_yaml_tree(run_config), str(run_config)))
    if want != have:
        diff = sorted(k for k in want if want[k] != have.get(k))
        raise SystemExit(f"error: {run_config} is not the {row} row's stage 1 (differs in {', '.join(diff)})")


def score(checkpoint: Path, val: Any) -> float:
    return float(evaluate_checkpoint(checkpoint, val)[0]["miou"])


# rows whose stage 1 is a run of the demo itself: reused from a `dast demo --seeds` folder
FROM_DEMO = {"baseline": "baseline", "da": "dast"}


def ablation(
    seeds: list[int], work: Path, workers: int, shift: str | None = None, demo: Path | None = None
) -> dict[str, Any]:
    per_seed: dict[str, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        trees = row_trees(seed, shift)
        runs = work / f"seed{seed}"
        runs.mkdir(parents=True, exist_ok=True)
        if demo is not None:  # the demo trained these rows already (same configs up to stage 1)
            for row, run in FROM_DEMO.items():
                source = DemoDir(demo).seed(seed).run(run)
                stage1_config_check(trees[row], source.config, row)
                link = runs / row
                if not link.exists():
                    link.symlink_to(source.root.resolve(), target_is_directory=True)
        todo = {name: tree for name, tree in trees.items() if demo is None or name not in FROM_DEMO}
        train_runs(todo, runs, workers, progress=False)
        cfg, val, _ = datasets(trees["da"])
        stages = {name: RunDir(runs / name).stage(STAGE1) for name in trees}
        per_seed[str(seed)] = {
            name: {"last": score(stage.checkpoint(cfg.train.steps), val), "selected": score(stage.selected, val)}
            for name, stage in stages.items()
        }
        print(f"seed {seed}: " + json.dumps(per_seed[str(seed)]), file=sys.stderr, flush=True)
    summary = {}
    for name in ROWS:
        for which in ("last", "selected"):
            vals = [per_seed[str(s)][name][which] for s in seeds]
            summary[f"{name}/{which}"] = {
                "mean": round(statistics.fmean(vals), 2),
                "min": round(min(vals), 2),
                "max": round(max(vals), 2),
            }
    return {"shift": demo_tree(shift=shift)["target"]["shift"], "per_seed": per_seed, "summary": summary}


def demo_pseudo_labels(demo_dir: Path) -> dict[str, Any]:
    """Precision of ``runs/dast/round1/pseudo_labels`` against the synthetic target labels."""
    run = DemoDir(demo_dir).run("dast")
    _, _, target = datasets(yaml.safe_load(run.config.read_text()))
    return pseudo_label_precision(run.round(1).pseudo_labels, target)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[], help="run the Table-3 ablation for these seeds")
    ap.add_argument("--work", type=Path, default=Path("ablation_runs"), help="run folders (resumed if present)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="runs trained at the same time")
    ap.add_argument(
        "--shift",
        choices=SHIFTS,
        default=None,
        help="the synthetic domains of the ablation (default: the demo's; use its own --work folder)",
    )
    ap.add_argument(
        "--from-demo",
        type=Path,
        default=None,
        help="a finished `dast demo --seeds` folder of the same shift: its baseline and DA runs are the "
        "baseline and da rows (their stage 1 is the rows' config), so only the other rows are trained",
    )
    ap.add_argument("--demo-dirs", type=Path, nargs="*", default=[], help="finished `dast demo` folders to analyse")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {}
    if args.seeds:
        result["ablation"] = ablation(args.seeds, args.work, args.workers, args.shift, args.from_demo)
    if args.demo_dirs:
        result["pseudo_labels"] = {str(d): demo_pseudo_labels(d) for d in args.demo_dirs}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
