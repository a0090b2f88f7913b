"""The demo's experiment: its config, the runs it trains and the variants it reports.

Five runs share every setting but the one they test:

* ``source_only`` — the segmentor on source labels only;
* ``source_only_bn`` — the same, with the target images forwarded through the segmentor in
  train mode at every step (no loss): its BatchNorm statistics see the target, as in every
  adapted run, so it is the matched control of the adaptation methods;
* ``baseline`` — AdaptSegNet single-level: an output-space discriminator with sigmoid BCE;
* ``dast`` — stage 1 is DA (discoverer + corrector + attention), then self-training rounds;
* ``oracle`` — the segmentor trained on *target* labels: the ceiling.

The reported variants are snapshots of these runs (:data:`VARIANT_SNAPSHOTS`): ``da`` is the
``dast`` run's stage 1, ``dast`` its last round, ``dast_best`` the best snapshot of all its
stages by the label-free score (``selection.across_stages``, an addition to the paper).
"""

from __future__ import annotations

import copy
from typing import Any

from dast.config import deep_merge
from dast.data.synthetic import DEMO_SHIFT, SHIFTS, check_shift
from dast.rundir import ONLINE, STAGE1

__all__ = [
    "DEMO_CONFIG",
    "DEMO_SHIFT",
    "FORKS",
    "baseline_lambda",
    "NO_ADVERSARY",
    "ONLINE_RUN",
    "QUICK",
    "RUNS",
    "SHIFTS",
    "SHIFT_SETTINGS",
    "VARIANTS",
    "VARIANT_SNAPSHOTS",
    "demo_tree",
    "online_overrides",
    "run_trees",
    "timm_overrides",
]

VARIANTS = ("source_only", "source_only_bn", "baseline", "da", "dast", "dast_best", "dast_online", "oracle")
RUNS = ("dast", "baseline", "source_only_bn", "source_only", "oracle", "dast_online")  # longest first
# run -> the run whose finished stage 1 it starts from (so DA is trained once)
FORKS: dict[str, str] = {"dast_online": "dast"}

# variant -> (run, stage); "last_round" and "across_stages" are resolved from the run's config;
# the oracle reports its last step (it is the ceiling, trained on target labels: no selection)
VARIANT_SNAPSHOTS: dict[str, tuple[str, str]] = {
    "source_only": ("source_only", STAGE1),
    "source_only_bn": ("source_only_bn", STAGE1),
    "baseline": ("baseline", STAGE1),
    "da": ("dast", STAGE1),
    "dast": ("dast", "last_round"),
    "dast_best": ("dast", "across_stages"),
    "dast_online": ("dast_online", ONLINE),
    "oracle": ("oracle", "stage1_last"),
}

# The canonical demo config; dast/configs/demo.yaml holds the same values (a test checks).
# The learning rates (segmentor 0.0025, discriminators 0.001: the paper's ratio 2.5), lambda
# 0.03 and the round's settings (frozen BatchNorm as released, lr 0.0003) were chosen by the
# label-free FDA score in benchmarks/demo_sweep.py, never on target labels (docs/synthetic.md).
DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "variant": "paper",
    "model": {"arch": "small", "num_classes": 7, "norm": "unit", "output_stride": 4},
    "source": {"kind": "synthetic", "domain": "source", "count": 300, "size": [128, 64], "shift": DEMO_SHIFT},
    "target": {
        "kind": "synthetic",
        "domain": "target",
        "count": 300,
        "size": [128, 64],
        "with_labels": False,
        "shift": DEMO_SHIFT,
    },
    "val": {"kind": "synthetic", "domain": "target", "count": 100, "size": [128, 64], "shift": DEMO_SHIFT},
    "adversarial": {
        "discoverer": True,
        "corrector": True,
        "attention": True,
        "loss": "lsgan",
        "lambda_d": 0.03,
        "lambda_c": 0.03,
        "lr": 0.001,
        "corrector_width": 16,
    },
    "train": {
        "steps": 1000,
        "poly_steps": 2000,
        "lr": 0.0025,
        "batch_size": 4,
        "num_workers": 0,
        "checkpoint_every": 250,
        "keep_last": 2,
        "eval_every": 250,
        "image_every": 250,
        "log_every": 25,
    },
    "self_training": {
        "rounds": 1,
        "steps": 300,
        "poly_steps": 2000,
        "portion": 0.5,
        "lr": 0.0003,
        "batchnorm": "frozen",
        "eval_every": 75,
    },
    "selection": {"enabled": True, "num_images": 60, "betas": [0.5, 0.9]},
    "runtime": {"device": "cpu"},
}

# --quick: the same pipeline at a fraction of the cost (for tests and a first look)
QUICK: dict[str, Any] = {
    "source": {"count": 64, "size": [96, 48]},
    "target": {"count": 64, "size": [96, 48]},
    "val": {"count": 24, "size": [96, 48]},
    "train": {
        "steps": 120,
        "poly_steps": 240,
        "checkpoint_every": 60,
        "eval_every": 60,
        "image_every": 60,
        "log_every": 20,
    },
    "self_training": {"steps": 40, "poly_steps": 240, "eval_every": 20},
    "selection": {"num_images": 12},
}

# The online stage of the dast_online run (DA, then online self-training with a mean teacher;
# an addition to the paper): chosen by the label-free FDA score in benchmarks/online_sweep.py
# on the sweep seeds, never on target labels (docs/online.md).
ONLINE_RUN: dict[str, Any] = {
    "self_training": {
        "mode": "online",
        "steps": 600,
        "poly_steps": 2000,
        "lr": 0.0025,
        "eval_every": 100,
        "online": {"ema": 0.99, "threshold": 0.9, "adversarial": "keep"},
    }
}
QUICK_ONLINE: dict[str, Any] = {"self_training": {"steps": 40, "poly_steps": 240, "eval_every": 20}}


def online_overrides(quick: bool = False) -> dict[str, Any]:
    """What the dast_online run changes in the DAST run's config (``quick``: a short stage)."""
    return deep_merge(ONLINE_RUN, QUICK_ONLINE) if quick else copy.deepcopy(ONLINE_RUN)


# The AdaptSegNet baseline's lambda, chosen like DA's by the label-free sweep (AdaptSegNet
# publishes 0.001 for GTA5; 0.01 scored best on the appearance shift, docs/synthetic.md) and,
# where the sweep on a shift picked another, that shift's (photographic: 0.003).
BASELINE_LAMBDA = 0.01
BASELINE_LAMBDA_BY_SHIFT: dict[str, float] = {"photographic": 0.003}


def baseline_lambda(shift: str) -> float:
    """The AdaptSegNet baseline's lambda on the synthetic domains of ``shift``."""
    return BASELINE_LAMBDA_BY_SHIFT.get(shift, BASELINE_LAMBDA)


NO_ADVERSARY = {"discoverer": False, "corrector": False, "attention": False}


def timm_overrides(name: str) -> dict[str, Any]:
    """The config change of ``dast demo --timm NAME``: every run's encoder is that timm model
    (random init, ImageNet normalisation) at timm's own output stride for it (the small
    net's stride 4 is below what timm's backbones dilate to)."""
    return {"model": {"arch": "timm", "timm_name": name, "norm": "imagenet", "output_stride": None}}


# Settings of a shift that differ from DEMO_CONFIG's, chosen for that shift by the label-free
# sweep (benchmarks/demo_sweep.py --shift S; docs/synthetic.md). Empty: the same settings.
SHIFT_SETTINGS: dict[str, dict[str, Any]] = {}


def demo_tree(
    *, quick: bool = False, seed: int = 0, shift: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The DAST run's config tree: :data:`DEMO_CONFIG` (+ :data:`QUICK`), the seed, the
    synthetic domains' shift (default :data:`DEMO_SHIFT`) with its :data:`SHIFT_SETTINGS`, and
    any ``overrides`` (a nested mapping, e.g. from a sweep)."""
    tree = deep_merge(DEMO_CONFIG, QUICK) if quick else copy.deepcopy(DEMO_CONFIG)
    tree["seed"] = int(seed)
    shift = check_shift(shift or DEMO_SHIFT)
    for name in ("source", "target", "val"):
        tree[name]["shift"] = shift
    tree = deep_merge(tree, SHIFT_SETTINGS.get(shift, {}))
    return deep_merge(tree, overrides or {})


def run_trees(base: dict[str, Any], online: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The config of every run of :data:`RUNS`, derived from the DAST run's ``base``;
    ``online``: the dast_online run's changes (default :func:`online_overrides`)."""
    src_only = deep_merge(base, {"adversarial": NO_ADVERSARY, "self_training": {"rounds": 0}})
    baseline = deep_merge(
        base,
        {
            "adversarial": {
                "discoverer": False,
                "corrector": True,
                "attention": False,
                "loss": "bce",
                "lambda_c": baseline_lambda(base["target"]["shift"]),
            },
            "self_training": {"rounds": 0},
        },
    )
    return {
        "dast": copy.deepcopy(base),
        "baseline": baseline,
        "source_only_bn": deep_merge(src_only, {"train": {"forward_target": True}}),
        "source_only": src_only,
        "oracle": deep_merge(src_only, {"source": {"domain": "target"}}),
        "dast_online": deep_merge(base, online if online is not None else online_overrides()),
    }
