"""Choose the demo's settings without target labels: a sweep scored by the label-free
FDA-restyled synthetic validation score (the paper's own model-selection criterion).

Two phases, each over several seeds, with every run trained by ``dast train``'s pipeline:

* ``stage1``: each setting of :data:`STAGE1` (learning rates at the paper's
  segmentor:discriminator ratio or the old demo's, lambda, the adversarial warm-up, the
  corrector weighting) trains DA's stage 1 (and the baseline for the learning-rate
  settings); a setting's score is the mean over seeds of the synthetic score of the snapshot
  stage 1 selects.
* ``online``: DA's stage 1 with the demo's current settings (trained once per seed), then
  each setting of :data:`ONLINE` (learning rate, teacher EMA, confidence threshold, the
  adversarial terms kept or dropped, the stage's length) trains the online stage from it
  (the dast_online run of the demo); a setting's score is the synthetic score of the
  snapshot the online stage selects.
* ``self-training``: from the stage-1 runs of ``--stage1-setting``, each setting of
  :data:`SELF_TRAINING` (BatchNorm mode, learning rate, steps, portion q, labelling rule)
  trains round 1 (the stage-1 folder is copied, so stage 1 is not retrained); a setting's
  score is the synthetic score of the snapshot the round selects.

The target val mIoU of the same snapshots is printed beside each score, only for
information: nothing is chosen on it. Prints a Markdown table and writes JSON with
``--out``. Example (2 cores)::

    python benchmarks/demo_sweep.py stage1 --seeds 100 101 --work /tmp/sweep --out stage1.json
    python benchmarks/demo_sweep.py self-training --seeds 100 101 --work /tmp/sweep \\
        --stage1-setting <best stage-1 setting> --out st.json
    python benchmarks/demo_sweep.py online --seeds 100 101 --work /tmp/sweep --out online.json

``--shift`` sweeps another pair of synthetic domains (e.g. ``--shift photographic``; use its
own ``--work`` folder, since run folders are named by setting and seed only).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple

from dast.atomic import write_json
from dast.checkpoint import read_meta
from dast.config import deep_merge
from dast.data.synthetic import SHIFTS
from dast.demo import demo_tree, run_trees, train_runs
from dast.demo.config import ONLINE_RUN
from dast.rundir import RunDir

PAPER_RATIO = 2.5  # segmentor : discriminator learning rate, 2.5e-4 : 1e-4 in the paper
ADAPTSEGNET_LAMBDA = 0.001  # the baseline's published lambda, used for the per-row baselines

# The demo's settings before this sweep chose them: every setting below changes only what it
# names, from these values, so that a row means the same whatever the demo's defaults are now
# (they were set from this sweep's results).
SWEEP_BASE: dict[str, Any] = {
    "adversarial": {
        "lr": 1e-4,
        "lambda_d": 0.01,
        "lambda_c": 0.01,
        "warmup_steps": 0,
        "warmup_ramp": 0,
    },
    "train": {"lr": 0.01},
    "self_training": {
        "lr": 0.002,
        "batchnorm": "train",
        "steps": 300,
        "portion": 0.5,
        "rule": "ratio",
        "adversarial": True,
        "eval_every": 75,
    },
}


def _lr(seg: float, ratio: float = PAPER_RATIO) -> dict[str, Any]:
    return {"train": {"lr": seg}, "adversarial": {"lr": seg / ratio}}


WARMUP = "warm-up"  # settings with this in their name start the adversarial terms after 20% of
# stage 1 and ramp them up over the next 20% (the steps depend on the demo's size)


def _warmup(tree: dict[str, Any]) -> dict[str, Any]:
    fifth = max(1, int(tree["train"]["steps"]) // 5)
    return {"adversarial": {"warmup_steps": fifth, "warmup_ramp": fifth}}


STAGE1: dict[str, dict[str, Any]] = {
    "old demo: lr 0.01, D/C lr 1e-4 (ratio 100), lambda 0.01": _lr(0.01, 100.0),
    "lr 0.01, ratio 2.5, lambda 0.01": _lr(0.01),
    "lr 0.01, ratio 2.5, lambda 0.001": deep_merge(_lr(0.01), {"adversarial": {"lambda_d": 0.001, "lambda_c": 0.001}}),
    "lr 0.01, ratio 2.5, lambda 0.01, warm-up": _lr(0.01),
    "lr 0.0025, ratio 2.5, lambda 0.01": _lr(0.0025),
    "lr 0.0025, ratio 2.5, lambda 0.001": deep_merge(
        _lr(0.0025), {"adversarial": {"lambda_d": 0.001, "lambda_c": 0.001}}
    ),
    "lr 0.0025, ratio 2.5, lambda 0.01, warm-up": _lr(0.0025),
    "lr 0.01, ratio 2.5, lambda 0.01, weighting both": deep_merge(
        _lr(0.01), {"adversarial": {"corrector_weighting": "both"}}
    ),
    # the grid's low edge won above, so it was extended (second pass; the first pass's runs are reused)
    "lr 0.001, ratio 2.5, lambda 0.01": _lr(0.001),
    "lr 0.0025, ratio 2.5, lambda 0.01, weighting both": deep_merge(
        _lr(0.0025), {"adversarial": {"corrector_weighting": "both"}}
    ),
    "lr 0.0025, ratio 2.5, lambda 0.03": deep_merge(_lr(0.0025), {"adversarial": {"lambda_d": 0.03, "lambda_c": 0.03}}),
    # third pass: lambda 0.03 won at the grid's edge
    "lr 0.0025, ratio 2.5, lambda 0.1": deep_merge(_lr(0.0025), {"adversarial": {"lambda_d": 0.1, "lambda_c": 0.1}}),
}

# The baseline's own lambda (AdaptSegNet publishes 0.001) at the learning rates chosen for both
# methods above, so that DA's tuned lambda is not compared with an untuned baseline.
BASELINE_LAMBDA_LR = 0.0025
BASELINE_LAMBDAS = (0.001, 0.003, 0.01, 0.03)

# The round's learning rate starts at stage 1's, as in the paper (2.5e-4 in both stages).
ST_LR = 0.0025
SELF_TRAINING: dict[str, dict[str, Any]] = {
    "base: BN train, lr 0.0025 (= stage 1), 300 steps, q 0.5, ratio rule": {"self_training": {"lr": ST_LR}},
    "BN frozen (as released)": {"self_training": {"lr": ST_LR, "batchnorm": "frozen"}},
    "lr 0.0005": {"self_training": {"lr": 0.0005}},
    "600 steps": {"self_training": {"lr": ST_LR, "steps": 600, "eval_every": 150}},
    "q 0.3": {"self_training": {"lr": ST_LR, "portion": 0.3}},
    "threshold rule": {"self_training": {"lr": ST_LR, "rule": "threshold"}},
    # second pass: lr 0.0005 won at the grid's edge; and the round without its adversarial terms
    "lr 0.0001": {"self_training": {"lr": 0.0001}},
    "lr 0.0005, no adversarial terms in the round": {"self_training": {"lr": 0.0005, "adversarial": False}},
    # third pass: frozen BatchNorm diverged at lr 0.0025; the released mode at lower rates
    "BN frozen, lr 0.0001": {"self_training": {"lr": 0.0001, "batchnorm": "frozen"}},
    "BN frozen, lr 0.0003": {"self_training": {"lr": 0.0003, "batchnorm": "frozen"}},
}


# The online stage (an addition to the paper): each setting changes the named value of
# ONLINE_BASE, the first setting being the base itself. The stage starts from DA's stage 1
# at the demo's settings; every run evaluates every 100 steps, so a run's selected snapshot
# also says how long the stage should be.
ONLINE_BASE: dict[str, Any] = copy.deepcopy(ONLINE_RUN)  # the demo's settings when this sweep ran (equal)
ONLINE: dict[str, dict[str, Any]] = {
    "base: lr 0.0025 (= stage 1), EMA 0.99, threshold 0.9, adversarial kept, 600 steps": {},
    "lr 0.001": {"self_training": {"lr": 0.001}},
    "lr 0.0003": {"self_training": {"lr": 0.0003}},
    "EMA 0.999": {"self_training": {"online": {"ema": 0.999}}},
    "threshold 0.968 (published)": {"self_training": {"online": {"threshold": 0.968}}},
    "adversarial terms dropped": {"self_training": {"online": {"adversarial": "drop"}}},
    "1200 steps": {"self_training": {"steps": 1200}},
}


def chosen(settings: dict[str, dict[str, Any]], only: list[str] | None) -> dict[str, dict[str, Any]]:
    """``settings`` restricted to the names in ``only`` (all of them without ``--only``)."""
    if not only:
        return settings
    unknown = [n for n in only if n not in settings]
    if unknown:
        raise SystemExit(f"error: unknown setting {unknown[0]!r}; choose from: " + "; ".join(settings))
    return {n: settings[n] for n in settings if n in only}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")[:60]


def _selected(run: RunDir, stage: str) -> dict[str, Any]:
    """The label-free score of a stage's selected snapshot, with the target mIoU of the same
    evaluation (information only) and the last evaluation's scores."""
    sel = read_meta(run.stage(stage).selected).get("selection") or {}
    curves = [h for h in json.loads(run.curves.read_text()) if h["stage"] == stage] if run.curves.exists() else []
    at = next((h for h in curves if h["step"] == sel.get("step")), {})
    last = curves[-1] if curves else {}
    return {
        "step": sel.get("step"),
        "synthetic": sel.get("value"),
        "target_info": at.get("target"),
        "last_synthetic": last.get("synthetic"),
        "last_target_info": last.get("target"),
    }


def _failed(reason: str) -> dict[str, Any]:
    """The scores of a run that stopped (e.g. its losses diverged): none, and the reason."""
    return {
        **dict.fromkeys(("step", "synthetic", "target_info", "last_synthetic", "last_target_info")),
        "failed": reason,
    }


def _phase_scores(
    settings: dict[str, Any], seeds: list[int], runs: Path, stage: str, failed: dict[str, str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """{setting: {seed: the scores of ``stage`` of its run (or why it failed)}}."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name in settings:
        for seed in seeds:
            folder = f"{_slug(name)}_s{seed}"
            scores = _failed(failed[folder]) if folder in failed else _selected(RunDir(runs / folder), stage)
            results.setdefault(name, {})[str(seed)] = scores
    return results


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None when any value is missing (a failed run fails its setting)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(v for v in values if v is not None)


def _summaries(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            k: _mean([r[k] for r in per_seed.values()])
            for k in ("synthetic", "target_info", "last_synthetic", "last_target_info")
        }
        for name, per_seed in results.items()
    }


def setting_overrides(name: str, change: dict[str, Any], quick: bool) -> dict[str, Any]:
    """A stage-1 setting's config changes from :data:`SWEEP_BASE` (the warm-up sized to the
    demo's stage 1)."""
    change = deep_merge(SWEEP_BASE, change)
    if WARMUP in name:
        return deep_merge(change, _warmup(demo_tree(quick=quick)))
    return change


class Sweep(NamedTuple):
    """What every phase takes: the seeds, the work folder, the demo size, parallel runs,
    the synthetic shift, progress output and (``--only``) the settings to sweep."""

    seeds: list[int]
    work: Path
    quick: bool = False
    workers: int = 2
    shift: str | None = None
    progress: bool = True
    only: list[str] | None = None


class BaselineGrid(NamedTuple):
    """Which AdaptSegNet baselines the stage-1 phase trains: the baseline's own lambdas (at
    :data:`BASELINE_LAMBDA_LR`) and, with ``per_row``, one at AdaptSegNet's lambda per DA row."""

    lambdas: tuple[float, ...] = BASELINE_LAMBDAS
    per_row: bool = True


def stage1_trees(
    seeds: list[int],
    quick: bool,
    shift: str | None,
    only: list[str] | None = None,
    baselines: BaselineGrid | None = None,
) -> dict[str, dict[str, Any]]:
    """Every run of the stage-1 phase, by folder name: DA per setting and seed, the baseline
    at the rows' learning rates (AdaptSegNet's lambda), and the baseline's own lambda grid."""
    baselines = baselines or BaselineGrid()
    trees: dict[str, dict[str, Any]] = {}
    stage1_only = {"self_training": {"rounds": 0}}
    adaptsegnet = {"adversarial": {"lambda_c": ADAPTSEGNET_LAMBDA}}
    for name, change in chosen(STAGE1, only).items():
        change = setting_overrides(name, change, quick)
        for seed in seeds:
            runs = run_trees(demo_tree(quick=quick, seed=seed, shift=shift, overrides=deep_merge(change, stage1_only)))
            trees[f"{_slug(name)}_s{seed}"] = runs["dast"]
            plain = "weighting" not in name and "warm-up" not in name and "lambda 0.01" in name
            if baselines.per_row and plain:
                trees[f"{_slug(name)}_s{seed}_baseline"] = deep_merge(runs["baseline"], adaptsegnet)
    for lam in baselines.lambdas:
        change = deep_merge(deep_merge(SWEEP_BASE, _lr(BASELINE_LAMBDA_LR)), stage1_only)
        for seed in seeds:
            base = demo_tree(quick=quick, seed=seed, shift=shift, overrides=change)
            trees[f"baseline_lambda{lam:g}_s{seed}"] = deep_merge(
                run_trees(base)["baseline"], {"adversarial": {"lambda_c": lam}}
            )
    return trees


def sweep_stage1(sweep: Sweep, baselines: BaselineGrid | None = None) -> dict[str, Any]:
    seeds, work, only = sweep.seeds, sweep.work, sweep.only
    baselines = baselines or BaselineGrid()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    baseline: dict[str, dict[str, dict[str, Any]]] = {}
    trees = stage1_trees(seeds, sweep.quick, sweep.shift, only, baselines)
    train_runs(trees, work / "stage1", sweep.workers, sweep.progress)
    baseline_lambda: dict[str, dict[str, dict[str, Any]]] = {}
    for lam in baselines.lambdas:
        for seed in seeds:
            run = RunDir(work / "stage1" / f"baseline_lambda{lam:g}_s{seed}")
            key = f"baseline, lr {BASELINE_LAMBDA_LR}, lambda {lam:g}"
            baseline_lambda.setdefault(key, {})[str(seed)] = _selected(run, "stage1")
    for name in chosen(STAGE1, only):
        for seed in seeds:
            results.setdefault(name, {})[str(seed)] = _selected(
                RunDir(work / "stage1" / f"{_slug(name)}_s{seed}"), "stage1"
            )
            b = work / "stage1" / f"{_slug(name)}_s{seed}_baseline"
            if b.exists():
                baseline.setdefault(name, {})[str(seed)] = _selected(RunDir(b), "stage1")
    return {
        "phase": "stage1",
        "seeds": seeds,
        "settings": STAGE1,
        "da": results,
        "da_mean": _summaries(results),
        "baseline": baseline,
        "baseline_mean": _summaries(baseline),
        "baseline_lambda": baseline_lambda,
        "baseline_lambda_mean": _summaries(baseline_lambda),
    }


def self_training_trees(
    seeds: list[int], quick: bool, shift: str | None, stage1_setting: str, only: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Every run of the self-training phase, by folder name: round 1 of each setting of
    :data:`SELF_TRAINING`, on top of ``stage1_setting``'s stage 1."""
    stage1 = setting_overrides(stage1_setting, STAGE1[stage1_setting], quick)
    trees: dict[str, dict[str, Any]] = {}
    for name, change in chosen(SELF_TRAINING, only).items():
        overrides = deep_merge(stage1, deep_merge({"self_training": {"rounds": 1}}, change))
        for seed in seeds:
            trees[f"{_slug(name)}_s{seed}"] = demo_tree(quick=quick, seed=seed, shift=shift, overrides=overrides)
    return trees


def sweep_self_training(sweep: Sweep, stage1_setting: str) -> dict[str, Any]:
    seeds, work, only = sweep.seeds, sweep.work, sweep.only
    if stage1_setting not in STAGE1:
        raise SystemExit(f"error: unknown stage-1 setting {stage1_setting!r}; choose from: " + "; ".join(STAGE1))
    trees = self_training_trees(seeds, sweep.quick, sweep.shift, stage1_setting, only)
    for name in trees:
        src = work / "stage1" / f"{_slug(stage1_setting)}_s{name.rsplit('_s', 1)[1]}"
        if not RunDir(src).stage("stage1").selected.exists():
            raise SystemExit(f"error: {src} has no finished stage 1; run the stage1 phase first")
        dst = work / "self_training" / name
        if not dst.exists():  # stage 1 is reused, not retrained (its manifest entry says complete)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("final", "report.html"))
    failed: dict[str, str] = {}
    train_runs(trees, work / "self_training", sweep.workers, sweep.progress, force=True, failures=failed)
    results = _phase_scores(chosen(SELF_TRAINING, only), seeds, work / "self_training", "round1", failed)
    for name, per_seed in results.items():
        for seed, scores in per_seed.items():
            scores["stage1"] = _selected(RunDir(work / "self_training" / f"{_slug(name)}_s{seed}"), "stage1")
    start = {name: {"stage1": {s: r["stage1"] for s, r in per_seed.items()}} for name, per_seed in results.items()}
    stage1_mean = _mean([r["stage1"]["synthetic"] for per_seed in results.values() for r in per_seed.values()])
    return {
        "phase": "self-training",
        "seeds": seeds,
        "stage1_setting": stage1_setting,
        "stage1_synthetic_mean": stage1_mean,
        "settings": SELF_TRAINING,
        "dast": results,
        "dast_mean": _summaries(results),
        "start": start,
        "failed": failed,
    }


def online_trees(
    seeds: list[int], quick: bool, shift: str | None, only: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every run of the online phase by folder name (DA's stage 1 per seed first, then each
    setting of :data:`ONLINE` per seed), and which DA run each online run forks."""
    trees: dict[str, dict[str, Any]] = {}
    forks: dict[str, str] = {}
    for seed in seeds:
        trees[f"da_s{seed}"] = demo_tree(
            quick=quick, seed=seed, shift=shift, overrides={"self_training": {"rounds": 0}}
        )
    for name, change in chosen(ONLINE, only).items():
        for seed in seeds:
            folder = f"{_slug(name)}_s{seed}"
            overrides = deep_merge(ONLINE_BASE, change)
            if quick:
                overrides = deep_merge(overrides, {"self_training": {"steps": 40, "eval_every": 20}})
            trees[folder] = demo_tree(quick=quick, seed=seed, shift=shift, overrides=overrides)
            forks[folder] = f"da_s{seed}"
    return trees, forks


def sweep_online(sweep: Sweep) -> dict[str, Any]:
    seeds, work, only = sweep.seeds, sweep.work, sweep.only
    trees, forks = online_trees(seeds, sweep.quick, sweep.shift, only)
    failed: dict[str, str] = {}
    train_runs(trees, work / "online", sweep.workers, sweep.progress, failures=failed, forks=forks)
    results = _phase_scores(chosen(ONLINE, only), seeds, work / "online", "online", failed)
    start = {str(s): _selected(RunDir(work / "online" / f"da_s{s}"), "stage1") for s in seeds}
    return {
        "phase": "online",
        "seeds": seeds,
        "base": ONLINE_BASE,
        "settings": ONLINE,
        "online": results,
        "online_mean": _summaries(results),
        "stage1": start,
        "stage1_synthetic_mean": _mean([r["synthetic"] for r in start.values()]),
        "failed": failed,
    }


def _fmt(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "-"


def table(means: dict[str, dict[str, Any]], title: str) -> str:
    if not means:
        return f"### {title}\n\n(not swept)"
    best = max(means, key=lambda n: means[n]["synthetic"] if means[n]["synthetic"] is not None else -1.0)
    lines = [
        f"### {title}",
        "",
        "| setting | label-free score (selected) | label-free (last) | target mIoU, info only "
        "(selected) | target mIoU, info only (last) |",
        "|---|---|---|---|---|",
    ]
    for name, m in means.items():
        mark = " **(chosen)**" if name == best else ""
        lines.append(
            f"| {name}{mark} | {_fmt(m['synthetic'])} | {_fmt(m['last_synthetic'])} | "
            f"{_fmt(m['target_info'])} | {_fmt(m['last_target_info'])} |"
        )
    if any(m["synthetic"] is None for m in means.values()):
        lines += ["", "-: a seed's run stopped on non-finite losses (the reason is under `failed` in the JSON)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["stage1", "self-training", "online"])
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--work", type=Path, required=True, help="folder for the runs (reused: finished runs are kept)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="the --quick demo sizes (a smoke test of the sweep)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shift", choices=SHIFTS, default=None, help="the synthetic domains' shift (default: the demo's)")
    p.add_argument("--stage1-setting", default=None, help="the stage-1 setting the rounds start from")
    p.add_argument("--only", nargs="+", default=None, help="sweep only these settings of the phase (by name)")
    p.add_argument(
        "--baseline-lambdas",
        type=float,
        nargs="+",
        default=list(BASELINE_LAMBDAS),
        help="stage1: the baseline's own lambdas to train (default: %(default)s)",
    )
    p.add_argument("--no-row-baselines", action="store_true", help="stage1: no AdaptSegNet-lambda baseline per DA row")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    sweep = Sweep(args.seeds, args.work, args.quick, args.workers, args.shift, not args.no_progress, args.only)
    if args.phase == "stage1":
        grid = BaselineGrid(tuple(args.baseline_lambdas), per_row=not args.no_row_baselines)
        out = sweep_stage1(sweep, grid)
        text = (
            table(out["da_mean"], "DA, stage 1")
            + "\n\n"
            + table(
                out["baseline_mean"],
                "AdaptSegNet baseline (its own lambda 0.001 and BCE; the learning rates of the row)",
            )
            + "\n\n"
            + table(out["baseline_lambda_mean"], "AdaptSegNet baseline: its lambda at the chosen learning rates")
        )
    elif args.phase == "online":
        out = sweep_online(sweep)
        text = table(
            out["online_mean"],
            f"Online stage from DA's stage 1 (stage 1's own label-free score: {_fmt(out['stage1_synthetic_mean'])})",
        )
    else:
        if args.stage1_setting is None:
            p.error("self-training needs --stage1-setting")
        out = sweep_self_training(sweep, args.stage1_setting)
        text = table(
            out["dast_mean"],
            f"DAST round 1 from '{args.stage1_setting}' (stage 1's own label-free "
            f"score: {_fmt(out['stage1_synthetic_mean'])})",
        )
    print(text)
    if args.out:
        write_json(args.out, {**copy.deepcopy(out), "table": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
