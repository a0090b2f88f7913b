"""Why does a self-training round with BatchNorm in train mode hurt the demo? The pseudo labels
are the model's own eval-mode predictions (running statistics); a train-mode round fits them
with *batch* statistics. This measures, on the target batches the round trains on, how far
the stage-1 model's train-mode forward is from those labels before any update.

Takes finished run directories that have round-1 pseudo labels (``dast demo`` or
``benchmarks/demo_sweep.py`` runs). Prints one JSON object per run::

    python benchmarks/batchnorm_gap.py RUN [RUN ...] [--batches 75]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from dast import losses
from dast.config import from_tree, load_yaml_tree
from dast.contexts import eval_mode
from dast.data.datasets import build_dataset, with_label_dir
from dast.models.io import load_networks
from dast.rundir import STAGE1, RunDir
from dast.training.loop import StageData
from dast.training.plans import stage_plans
from dast.training.runtime import make_runtime


def measure(run_dir: Path, batches: int) -> dict[str, object]:
    run = RunDir(run_dir)
    cfg = from_tree(load_yaml_tree(run.config), str(run.config))
    n, norm = cfg.model.num_classes, cfg.model.norm
    source = build_dataset(cfg.source, norm=norm, num_classes=n, with_labels=True, seed=cfg.seed)
    target = build_dataset(cfg.target, norm=norm, num_classes=n, with_labels=False, seed=cfg.seed + 1)
    labels = run.round(1).pseudo_labels
    nets, _, _ = load_networks(run.stage(STAGE1).selected, "cpu")
    model = nets.target_model()
    if cfg.self_training.rounds < 1:
        raise SystemExit(f"error: {run_dir} has no self-training round")
    plan = stage_plans(cfg, 1)[1]  # round 1, as the run trained it
    data = StageData(cfg, plan, make_runtime(cfg.runtime), source, with_label_dir(target, labels))
    data.open(0)
    ce_eval, ce_train, agree = [], [], []
    try:
        for _ in range(batches):
            _, batch = data.next()
            assert batch is not None
            x, y = batch["image"], batch["label"]
            with torch.no_grad():
                with eval_mode(model):
                    logits_eval, _ = model(x)
                probe = copy.deepcopy(model).train()  # batch statistics; the model's own running ones stay put
                logits_train, _ = probe(x)
            ce_eval.append(float(losses.segmentation_loss(logits_eval, y)))
            ce_train.append(float(losses.segmentation_loss(logits_train, y)))
            labelled = y != 255
            pred = losses.upsample(logits_train, tuple(y.shape[-2:])).argmax(1)
            agree.append(float((pred[labelled] == y[labelled]).float().mean()))
    finally:
        data.close()
    return {
        "run": str(run_dir),
        "batches": batches,
        "pseudo_label_ce_eval_mode_median": statistics.median(ce_eval),
        "pseudo_label_ce_train_mode_median": statistics.median(ce_train),
        "pseudo_label_ce_train_mode_max": max(ce_train),
        "train_mode_agreement_percent": 100.0 * statistics.fmean(agree),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--batches", type=int, default=75, help="target batches to measure (default 75: one epoch)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for run in args.runs:
        print(json.dumps(measure(run, args.batches)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
