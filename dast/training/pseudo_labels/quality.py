"""How right pseudo labels are, where the target set has labels (e.g. the synthetic domains).

Two ways, with one definition of the numbers (:func:`label_scores`):

* :func:`pseudo_label_precision` scores a written set (the PNGs of
  :func:`~dast.training.pseudo_labels.generate.generate_pseudo_labels`);
* :func:`pseudo_label_quality` scores one or more labelling rules from the model directly,
  without writing anything: the thresholds are estimated once (the same streaming passes as
  the generation) and a last pass labels every image under each rule.

Only pixels whose ground truth is a class count (ground-truth ignore pixels are left out).
Of those, for a rule: ``precision`` = % of the labelled pixels whose label is the ground
truth, ``labelled_fraction`` = % that got a label; per class ``c``: precision = right /
pixels labelled ``c`` (None when none is), labelled fraction = pixels labelled ``c`` / all
counted pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dast.config import SelfTrainingConfig
from dast.data.transforms import resize_label
from dast.errors import DataError, UserError
from dast.execution import Execution
from dast.training.pseudo_labels.generate import (
    _Run,
    check_settings,
    estimate_thresholds,
    evaluating,
    label_path,
    model_num_classes,
)
from dast.training.pseudo_labels.thresholds import (
    IGNORE_INDEX,
    RULES,
    check_rule,
    select_labels,
)


def _percent(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def class_names(dataset: Any, num_classes: int) -> list[str]:
    """``dataset.table.names`` when there is one name per class, else ``"0"``, ``"1"``, ..."""
    names = list(getattr(getattr(dataset, "table", None), "names", []))
    return names if len(names) == num_classes else [str(c) for c in range(num_classes)]


def label_scores(correct: Sequence[int], labelled: Sequence[int], pixels: int, names: Sequence[str]) -> dict[str, Any]:
    """The scores of a labelling from per-class counts: ``correct[c]`` pixels labelled ``c``
    rightly, ``labelled[c]`` pixels labelled ``c``, ``pixels`` counted pixels in all.

    ``precision`` and ``labelled_fraction`` in %, ``per_class_precision`` (None for a class
    never labelled) and ``per_class_labelled`` (pixel counts), keyed by class name.
    """
    right, total = int(sum(correct)), int(sum(labelled))
    return {
        "precision": _percent(right, total),
        "labelled_fraction": _percent(total, pixels),
        "per_class_precision": {n: _percent(int(correct[c]), int(labelled[c])) for c, n in enumerate(names)},
        "per_class_labelled": {n: int(labelled[c]) for c, n in enumerate(names)},
    }


def pseudo_label_precision(label_dir: str | Path, dataset: Any) -> dict[str, Any]:
    """Score a pseudo-label set against a labelled copy of its target ``dataset``.

    Each ground truth is resized (nearest) to its pseudo label's size, as training pairs them.
    Returns :func:`label_scores`. Images without a label file (unreadable ones, under
    ``on_corrupt: skip``) are left out.
    """
    n = int(dataset.num_classes)
    correct = np.zeros(n, dtype=np.int64)
    labelled = np.zeros(n, dtype=np.int64)
    pixels = 0
    for i, name in enumerate(dataset.names):
        path = label_path(label_dir, name)
        if not path.is_file():
            continue
        with Image.open(path) as im:
            pl = np.asarray(im)
        gt = resize_label(dataset.read_label_native(i), (pl.shape[1], pl.shape[0]))
        valid = gt != IGNORE_INDEX
        pixels += int(valid.sum())
        pl, gt = pl[valid], gt[valid]
        labelled += np.bincount(pl[pl < n], minlength=n)[:n]
        correct += np.bincount(pl[(pl < n) & (pl == gt)], minlength=n)[:n]
    return label_scores(correct.tolist(), labelled.tolist(), pixels, class_names(dataset, n))


class _Tally:
    """Per-rule pixel counts of the scoring pass (on the device of the probabilities)."""

    def __init__(self, rules: Sequence[str], num_classes: int, device: torch.device) -> None:
        def zeros() -> Tensor:
            return torch.zeros(num_classes, dtype=torch.int64, device=device)

        self.num_classes = num_classes
        self.correct = {r: zeros() for r in rules}
        self.labelled = {r: zeros() for r in rules}
        self.relabelled = {r: torch.zeros((), dtype=torch.int64, device=device) for r in rules}
        self.pixels = 0
        self.images = 0

    def add(self, prob: Tensor, thresholds: Tensor, gt: Tensor) -> None:
        """Count one batch: ``prob`` N x C x H x W, ``gt`` N x H x W (255 = not counted)."""
        n = self.num_classes
        valid = gt != IGNORE_INDEX
        self.pixels += int(valid.sum())
        self.images += int(gt.shape[0])
        argmax = torch.max(prob, dim=1)[1]
        for rule in self.correct:
            label = select_labels(prob, thresholds, rule).long()
            counted = valid & (label != IGNORE_INDEX)
            self.labelled[rule] += torch.bincount(label[counted], minlength=n)
            self.correct[rule] += torch.bincount(label[counted & (label == gt)], minlength=n)
            self.relabelled[rule] += (counted & (label != argmax)).sum()

    def scores(self, rule: str, names: Sequence[str]) -> dict[str, Any]:
        """:func:`label_scores` of ``rule``, plus the per-class labelled fractions and the
        ``relabelled_fraction``: % of the labelled pixels whose label is not their argmax."""
        labelled = self.labelled[rule].tolist()
        out = label_scores(self.correct[rule].tolist(), labelled, self.pixels, names)
        out["per_class_labelled_fraction"] = {n: _percent(int(labelled[c]), self.pixels) for c, n in enumerate(names)}
        out["relabelled_fraction"] = _percent(int(self.relabelled[rule]), int(sum(labelled)))
        return out


def _score_pass(run: _Run, thresholds: Tensor, rules: Sequence[str]) -> _Tally:
    tally = _Tally(rules, thresholds.numel(), run.device)
    for prob, names, labels in run.probabilities("pseudo labels: scoring"):
        if labels is None:
            raise DataError(
                f"pseudo-label quality needs the target labels, but image {names[0]!r} has none "
                "(build the dataset with labels)"
            )
        if tuple(labels.shape) != (prob.shape[0], *prob.shape[2:]):
            raise DataError(
                f"labels of size {tuple(labels.shape[1:])} do not match the images "
                f"({tuple(prob.shape[2:])}) in the batch of {names[0]!r}"
            )
        tally.add(prob, thresholds.to(prob.device), labels.to(prob.device))
    return tally


def pseudo_label_quality(
    model: nn.Module,
    dataset: Any,
    settings: SelfTrainingConfig,
    *,
    rules: Sequence[str] = RULES,
    execution: Execution | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Score pseudo labels of ``dataset`` under each of ``rules`` against its labels; writes nothing.

    ``dataset[i]`` gives ``{"image", "name", "label"}`` (the label N x H x W at the image
    size, 255 ignored), e.g. a synthetic target built with labels. The thresholds are those
    :func:`generate_pseudo_labels` computes with the same ``settings`` (one estimation for
    all rules); then one more pass labels every image. A single process scores the whole
    set (``execution.indices`` is not used; default: no progress bar).
    Returns the settings, ``thresholds``, ``num_images``, ``pixels`` (counted ground-truth
    pixels), ``skipped`` and ``rules``: ``{rule: scores}`` (see :class:`_Tally.scores`).
    """
    ex = execution or Execution(progress=False)
    check_settings(settings, ex)
    rules = list(rules)
    if not rules or len(set(rules)) != len(rules):
        raise UserError(f"give each pseudo-label rule to score once, got {rules}")
    for rule in rules:
        check_rule(rule)
    if len(dataset) == 0:
        raise DataError("no images to pseudo-label")
    run = _Run.of(model, dataset, replace(ex, indices=None), ex.progress)
    with evaluating(model, run.device):
        est = estimate_thresholds(run, num_classes or model_num_classes(model), settings, reduce=False)
        thresholds = est.thresholds(settings.portion, settings.cap)
        tally = _score_pass(run, thresholds, rules)
    if tally.images == 0:
        raise DataError(f"no readable image to score ({len(run.skipped)} unreadable)")
    names = class_names(dataset, est.num_classes)
    return {
        "portion": float(settings.portion),
        "cap": float(settings.cap),
        "mode": settings.estimator,
        "bins": int(settings.bins) if settings.estimator == "histogram" else None,
        "subsample": int(settings.subsample),
        "thresholds": [float(v) for v in thresholds.cpu().tolist()],
        "num_images": tally.images,
        "pixels": tally.pixels,
        "skipped": sorted(run.skipped),
        "rules": {rule: tally.scores(rule, names) for rule in rules},
    }
