"""How a pass over a dataset runs: device, precision, batching, workers, shard, progress.

One :class:`Execution` is what evaluation, pseudo-labelling and prediction take besides
their own settings, so a command builds it once from its flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Execution:
    """Where and how a pass over a dataset runs.

    ``indices``: the images this process handles (its shard under torch.distributed; None:
    all); ``progress``: show a bar (or, off a terminal, progress lines)."""

    device: torch.device | str = "cpu"
    amp_dtype: torch.dtype | None = None
    batch_size: int = 1
    num_workers: int = 0
    indices: Sequence[int] | None = None
    progress: bool = True

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def order(self, length: int) -> list[int]:
        """The indices to visit of a dataset of ``length`` images."""
        return list(range(length)) if self.indices is None else [int(i) for i in self.indices]
