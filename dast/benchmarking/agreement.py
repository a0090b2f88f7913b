"""How close two training runs (or two inference paths) are: the fast-mode acceptance rules.

* Losses: from the same weights on the same batches, the first-step values may differ by
  ``first_rtol`` (only the precision differs there), and the means over consecutive
  windows of ``window`` steps by ``window_rtol``, both relative to
  ``max(|eager value|, atol_floor)``.
* Inference: the fraction of pixels with the same predicted class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import Tensor


@dataclass(frozen=True)
class LossTolerance:
    """Acceptance of a fast run against an eager run (see the module doc)."""

    first_rtol: float = 0.02
    window: int = 20
    window_rtol: float = 0.10
    atol_floor: float = 0.05
    control_factor: float = 3.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rel(a: float, b: float, floor: float) -> float:
    return abs(a - b) / max(abs(a), floor)


def _worst_window(a: np.ndarray, b: np.ndarray, window: int, floor: float) -> float:
    n = min(len(a), len(b))
    w = max(min(window, n), 1)
    return max(_rel(float(a[i : i + w].mean()), float(b[i : i + w].mean()), floor) for i in range(0, n - w + 1, w))


def compare_losses(
    eager: Mapping[str, Sequence[float]],
    fast: Mapping[str, Sequence[float]],
    tol: LossTolerance = LossTolerance(),
    control: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per loss key: first-step and worst windowed-mean relative differences, and ``pass``
    (with ``control``: also the control run's worst windowed difference from eager)."""
    result: dict[str, dict[str, Any]] = {}
    for key in sorted(set(eager) | set(fast)):
        if key not in eager or key not in fast or not len(eager[key]) or not len(fast[key]):
            result[key] = {"pass": False, "reason": "missing in one run"}
            continue
        a, b = np.asarray(eager[key], np.float64), np.asarray(fast[key], np.float64)
        first = _rel(float(a[0]), float(b[0]), tol.atol_floor)
        worst = _worst_window(a, b, tol.window, tol.atol_floor)
        n = min(len(a), len(b))
        w = max(min(tol.window, n), 1)
        allowed = tol.window_rtol
        entry: dict[str, Any] = {
            "eager_first": round(float(a[0]), 6),
            "fast_first": round(float(b[0]), 6),
            "first_rel_diff": float(f"{first:.3g}"),
            "eager_last_window": round(float(a[n - w : n].mean()), 6),
            "fast_last_window": round(float(b[n - w : n].mean()), 6),
            "max_window_rel_diff": float(f"{worst:.3g}"),
        }
        if control is not None and len(control.get(key, ())):
            c_worst = _worst_window(a, np.asarray(control[key], np.float64), tol.window, tol.atol_floor)
            entry["control_max_window_rel_diff"] = float(f"{c_worst:.3g}")
            allowed = max(allowed, tol.control_factor * c_worst)
        entry["allowed_window_rel_diff"] = float(f"{allowed:.3g}")
        entry["pass"] = bool(first <= tol.first_rtol and worst <= allowed)
        result[key] = entry
    return result


def pixel_agreement(a: Tensor, b: Tensor) -> float:
    """Fraction of equal entries of two class maps of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"class maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a == b).sum()) / max(a.numel(), 1)


def loss_history(outs: Sequence[Mapping[str, Tensor]]) -> dict[str, list[float]]:
    """``loss/*`` entries of per-step outputs as lists of floats."""
    hist: dict[str, list[float]] = {}
    for out in outs:
        for k, v in out.items():
            if k.startswith("loss/"):
                hist.setdefault(k, []).append(float(v))
    return hist
