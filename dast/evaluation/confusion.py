"""A confusion matrix accumulated on the device with ``torch.bincount``."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """``matrix[g, p]`` counts pixels with ground truth ``g`` predicted as ``p`` (int64).

    Ground-truth values outside ``0..num_classes-1`` (255 = ignore) are not counted;
    a prediction outside that range is a ValueError (checked unless ``check=False``,
    which avoids a device synchronisation for predictions that are valid by
    construction, such as an argmax).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, check: bool = True) -> None:
        """Add a batch of predictions and ground truths of the same shape."""
        p = torch.as_tensor(pred).to(self.device, non_blocking=True).long().reshape(-1)
        t = torch.as_tensor(target).to(self.device, non_blocking=True).long().reshape(-1)
        if p.shape != t.shape:
            raise ValueError(f"prediction has {p.numel()} pixels but the target has {t.numel()}")
        n = self.num_classes
        valid = (t >= 0) & (t < n)
        if check and bool((valid & ((p < 0) | (p >= n))).any()):
            raise ValueError(f"predictions must lie in 0..{n - 1}")
        # Ignored pixels go to an extra bin that is dropped (no boolean indexing, no extra sync).
        flat = torch.where(valid, t * n + p, torch.full_like(t, n * n))
        counts = torch.bincount(flat, minlength=n * n + 1)[: n * n]
        self.matrix += counts.reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix of the same size into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix.to(self.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over the ranks of ``torch.distributed`` (no-op when not initialised)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def numpy(self) -> np.ndarray:
        """The matrix as an int64 numpy array on the host."""
        return self.matrix.detach().cpu().numpy().astype(np.int64)

    def reset(self) -> None:
        self.matrix.zero_()
