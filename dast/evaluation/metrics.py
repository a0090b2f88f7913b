"""Per-class IoU, mIoU (over all classes and over protocol subsets) and printed tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PROTOCOL_TITLES = {"miou": "mIoU", "miou_16": "mIoU-16", "miou_13": "mIoU*-13"}


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class (0..1); NaN where a class has neither gt nor prediction."""
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    denom = m.sum(axis=1) + m.sum(axis=0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), np.nan)


def _mean_percent(values: np.ndarray) -> float | None:
    finite = values[~np.isnan(values)]
    return float(finite.mean() * 100.0) if finite.size else None


def compute_metrics(
    matrix: np.ndarray,
    class_names: Sequence[str],
    protocols: Mapping[str, Sequence[int]] | None = None,
    num_images: int = 0,
) -> dict[str, Any]:
    """``{"miou", "per_class", <protocol keys>, "num_images"}``, IoUs in percent.

    ``miou`` is the mean over classes with a defined IoU. Each protocol (e.g.
    ``miou_13``) is the mean over its own classes' IoUs, never a rescaled total. An
    undefined value (no pixels at all) is ``None``.
    """
    iou = iou_per_class(matrix)
    if len(class_names) != iou.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {iou.shape[0]}-class confusion matrix")
    out: dict[str, Any] = {
        "miou": _mean_percent(iou),
        "per_class": {name: (None if math.isnan(v) else float(v * 100.0)) for name, v in zip(class_names, iou)},
    }
    for key, classes in (protocols or {}).items():
        out[key] = _mean_percent(iou[list(classes)])
    out["num_images"] = int(num_images)
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_table(metrics: Mapping[str, Any]) -> str:
    """The per-class IoUs in table order, followed by the mIoU columns, as aligned text."""
    cols: list[tuple[str, str]] = [(name, _fmt(v)) for name, v in metrics["per_class"].items()]
    for key in ("miou", *[k for k in metrics if k.startswith("miou_")]):
        if key in metrics:
            cols.append((PROTOCOL_TITLES.get(key, key), _fmt(metrics[key])))
    widths = [max(len(h), len(v)) for h, v in cols]
    head = " | ".join(h.rjust(w) for (h, _), w in zip(cols, widths))
    vals = " | ".join(v.rjust(w) for (_, v), w in zip(cols, widths))
    rule = "-+-".join("-" * w for w in widths)
    return f"{head}\n{rule}\n{vals}\n({metrics.get('num_images', 0)} images)"
