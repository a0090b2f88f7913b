"""The demo's measurements of *why*: does the attention find the hard pixels, do the
discriminators tell the domains apart, how right are the pseudo labels.

* :func:`attention_auroc` — the paper's Figure-3 claim, that alpha = |tanh(D(f))| marks the
  regions that adapt badly: the AUROC with which DA's alpha ranks the target val pixels that
  the *source-only* model gets wrong above those it gets right (0.5: alpha finds nothing).
* :func:`discriminator_separation` — the mean outputs of D and C on source and on target
  over stage 1 (least squares: source -> 0, target -> 1), from ``scalars.jsonl``.
* :func:`pseudo_label_report` — precision and labelled share of the pseudo labels the
  stage-1 model would give the target training images, per class, under both labelling rules.
* :func:`online_labels` — how right the online stage's teacher and student are on the
  target val set at the stage's end: all pixels, and the confident ones the loss weight counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dast.config import SelfTrainingConfig
from dast.constants import IGNORE_INDEX
from dast.contexts import eval_mode
from dast.evaluation.auroc import auroc
from dast.models.io import Networks, load_networks
from dast.models.target_model import predict_full_res
from dast.rundir import STAGE1
from dast.training.online.recipe import teacher_networks
from dast.training.pseudo_labels import pseudo_label_quality

SEPARATION_KEYS = {"D": ("out/d_source", "out/d_target"), "C": ("out/c_source", "out/c_target")}


def attention_auroc(da: Networks, source_only: Networks, val: Any) -> dict[str, float]:
    """How well DA's attention ranks the pixels the source-only model gets wrong (see module doc)."""
    scores, wrong = [], []
    da_model, so_model = da.target_model(), source_only.target_model()
    with eval_mode(*da.modules(), *source_only.modules()):
        for i in range(len(val)):
            label = np.asarray(val.read_label_native(i))
            x = val.prepare_image(i)[None]
            _, alpha = predict_full_res(da_model, x, label.shape)
            logits, _ = predict_full_res(so_model, x, label.shape)
            valid = label != IGNORE_INDEX
            pred = logits.argmax(1)[0].numpy()
            scores.append(alpha[0, 0].numpy()[valid])
            wrong.append((pred != label)[valid])
    s, w = np.concatenate(scores), np.concatenate(wrong)
    return {
        "auroc": auroc(s, w),
        "pixels": int(s.size),
        "source_only_error_rate": float(w.mean()),
        "mean_attention_on_errors": float(s[w].mean()) if w.any() else float("nan"),
        "mean_attention_on_correct": float(s[~w].mean()) if (~w).any() else float("nan"),
    }


def read_scalar_series(path: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` of the scalars logged under ``<prefix>/``."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return series
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        for key, value in row.items():
            if key.startswith(prefix + "/"):
                series.setdefault(key[len(prefix) + 1 :], []).append((int(row["step"]), float(value)))
    return series


def discriminator_separation(scalars: Path, stage: str = STAGE1, tail: float = 0.2) -> dict[str, Any]:
    """Mean D and C outputs on source and target, over the last ``tail`` of the stage's
    logged steps, and the whole series (for the figure)."""
    series = read_scalar_series(scalars, stage)
    out: dict[str, Any] = {"series": {}}
    for net, (src_key, tgt_key) in SEPARATION_KEYS.items():
        src, tgt = series.get(src_key, []), series.get(tgt_key, [])
        if not src or not tgt:
            continue
        k = max(1, int(round(len(src) * tail)))
        s, t = float(np.mean([v for _, v in src[-k:]])), float(np.mean([v for _, v in tgt[-k:]]))
        out[net] = {"source": s, "target": t, "gap": t - s}
        out["series"][net] = {
            "steps": [st for st, _ in src],
            "source": [v for _, v in src],
            "target": [v for _, v in tgt],
        }
    return out


def pseudo_label_report(model_nets: Networks, target_with_labels: Any, settings: SelfTrainingConfig) -> dict[str, Any]:
    """:func:`pseudo_label_quality` of the model that makes round 1's labels, both rules."""
    with torch.no_grad():
        return pseudo_label_quality(
            model_nets.target_model(), target_with_labels, settings, rules=("ratio", "threshold")
        )


class _LabelTally:
    """Pixel counts of one model's argmax labels against the ground truth."""

    def __init__(self, num_classes: int) -> None:
        self.right = self.labelled = self.confident = self.confident_right = 0
        self.class_right = torch.zeros(num_classes, dtype=torch.int64)
        self.class_predicted = torch.zeros(num_classes, dtype=torch.int64)

    def add(self, prob: torch.Tensor, label: torch.Tensor, threshold: float) -> None:
        top, pred = prob.max(dim=1)
        valid = label != IGNORE_INDEX
        ok = (pred == label) & valid
        sure = (top >= threshold) & valid
        self.labelled += int(valid.sum())
        self.right += int(ok.sum())
        self.confident += int(sure.sum())
        self.confident_right += int((ok & sure).sum())
        self.class_predicted += torch.bincount(pred[valid], minlength=len(self.class_predicted))
        self.class_right += torch.bincount(pred[ok], minlength=len(self.class_right))

    def scores(self, names: list[str]) -> dict[str, Any]:
        def pct(a: int, b: int) -> float | None:
            return 100.0 * a / b if b else None

        return {
            "precision": pct(self.right, self.labelled),
            "confident_share": pct(self.confident, self.labelled),
            "confident_precision": pct(self.confident_right, self.confident),
            "per_class_precision": {
                n: pct(int(self.class_right[k]), int(self.class_predicted[k])) for k, n in enumerate(names)
            },
        }


def label_scores(model: torch.nn.Module, val: Any, threshold: float) -> dict[str, Any]:
    """A target model's argmax labels on ``val`` against its labels: precision over every
    labelled pixel, the share of pixels with top probability >= ``threshold`` and their
    precision, and the precision of each predicted class (in %)."""
    tally = _LabelTally(val.num_classes)
    with eval_mode(model), torch.no_grad():
        for i in range(len(val)):
            item = val.item_or_none(i, augment=False)
            assert item is not None
            logits, _ = predict_full_res(model, item["image"][None])
            tally.add(torch.softmax(logits, dim=1), item["label"][None], threshold)
    return tally.scores(list(val.table.names))


def online_labels(checkpoint: Path, val: Any, threshold: float) -> dict[str, Any]:
    """:func:`label_scores` of the teacher and of the student of an online stage's checkpoint."""
    student, _, _ = load_networks(checkpoint)
    return {
        "teacher": label_scores(teacher_networks(checkpoint).target_model(), val, threshold),
        "student": label_scores(student.target_model(), val, threshold),
    }
