"""Label-free model selection on a synthetic validation set (paper, "When to start the
self-training"): source images restyled to the target domain with FDA, one set per beta.
The score is the mean mIoU over the betas (the paper uses beta = 0.5 and 0.9)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dast.data import fda
from dast.data.transforms import normalize, resize_image, resize_label
from dast.evaluation.evaluate import evaluate_model
from dast.execution import Execution
from dast.parallel import shard


class FDAValSet(Dataset):
    """Source images (with labels) restyled with FDA towards random target images.

    Picks ``num_images`` source samples and one style image each, deterministically from
    ``seed``. Items look like a labelled :class:`~dast.data.datasets.SegmentationDataset`:
    evaluation uses the source label at the source input size. A restyled image is
    computed once and kept (up to ``CACHE_BYTES`` in all): the set is evaluated at every
    model-selection point and the FFTs would otherwise be redone each time.
    """

    CACHE_BYTES = 256 * 2**20

    def __init__(self, source: Any, target: Any, num_images: int, beta: float, seed: int = 0) -> None:
        rng = np.random.default_rng([int(seed), 4242])
        n = min(num_images, len(source))
        self.source, self.target, self.beta = source, target, float(beta)
        self.src_idx = np.sort(rng.choice(len(source), size=n, replace=False)).tolist()
        self.tgt_idx = rng.integers(0, len(target), size=n).tolist()
        self.names = [f"{source.names[i]}_fda{beta:g}" for i in self.src_idx]
        self.table = source.table
        self.num_classes = source.num_classes
        self.has_labels = True
        self.kind = "fda"
        self.norm = source.norm
        self.size = source.size
        self._restyled: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.src_idx)

    def read_image_rgb(self, i: int) -> np.ndarray:
        """Source image ``i`` restyled towards its target image (read-only, cached)."""
        hit = self._restyled.get(i)
        if hit is not None:
            return hit
        src = self.source.read_image_rgb(self.src_idx[i])

        tgt = resize_image(self.target.read_image_rgb(self.tgt_idx[i]), (src.shape[1], src.shape[0]))
        out = fda.fda_image(src, tgt, self.beta)
        out.setflags(write=False)  # shared by every later read
        if self._cached_bytes + out.nbytes <= self.CACHE_BYTES:
            self._restyled[i] = out
            self._cached_bytes += out.nbytes
        return out

    def read_label_native(self, i: int) -> np.ndarray:
        """The source label at the source input size (what the restyled image shows)."""
        label = self.source.read_label_native(self.src_idx[i])
        return resize_label(label, self.size) if self.size else label

    def prepare_image(self, i: int) -> torch.Tensor:
        return normalize(self.read_image_rgb(i), self.norm)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = i % len(self)
        return {"image": self.prepare_image(i), "name": self.names[i], "index": i}


def build_selection_sets(
    source: Any, target: Any, num_images: int, betas: Sequence[float], seed: int
) -> list[tuple[float, FDAValSet]]:
    """One FDA set per beta; the same source images and style images for every beta."""
    return [(float(b), FDAValSet(source, target, num_images, b, seed)) for b in betas]


def selection_score(
    model: torch.nn.Module,
    sets: Sequence[tuple[float, FDAValSet]],
    execution: Execution | None = None,
    *,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """mIoU on each FDA set and their mean (``score``); under DDP (``world`` > 1) each
    rank scores its shard of every set and all get the union's scores."""
    ex = execution or Execution(progress=False)
    out: dict[str, float] = {}
    for beta, ds in sets:
        m = evaluate_model(
            model,
            ds,
            replace(ex, indices=shard(len(ds), rank, world)),
            distributed=world > 1,
            protocols={},
            desc=f"selection (FDA beta {beta:g})",
        )
        out[f"miou_beta{beta:g}"] = float(m["miou"])
    out["score"] = float(np.mean([out[f"miou_beta{b:g}"] for b, _ in sets])) if sets else float("nan")
    return out
