"""A deterministic, resumable, distributed-aware infinite sampler.

The global sample sequence is a concatenation of per-epoch permutations seeded by
``(seed, epoch)``. Step ``s`` of a run with ``world`` ranks and ``batch`` images per rank
consumes global positions ``[s*world*batch, (s+1)*world*batch)``; rank ``r`` takes the
``r``-th run of ``batch`` positions. So N ranks with batch B see exactly the data of one
process with batch N*B, and a resumed run only needs the step number.

Yielded indices are ``i + epoch * n``: datasets take ``index % n`` and may seed
per-sample augmentation with the full value.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of epoch ``epoch``."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919) % (2**63 - 1))
    return torch.randperm(n, generator=g)


class StepSampler(Sampler[int]):
    """Infinite sampler starting at ``start_step``; see the module docstring."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.batch, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world, self.shuffle = start_step, rank, world_size, shuffle

    def positions(self) -> Iterator[int]:
        """This rank's global positions, from ``start_step`` on (``batch`` per step)."""
        step = self.start_step
        while True:
            base = (step * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)
            step += 1

    def __iter__(self) -> Iterator[int]:
        cached_epoch, perm = -1, torch.arange(0)
        for pos in self.positions():
            epoch, j = divmod(pos, self.n)
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, epoch_permutation(self.n, self.seed, epoch, self.shuffle)
            yield int(perm[j]) + epoch * self.n

    def __len__(self) -> int:  # an infinite sampler; DataLoader only needs this for len()
        return 2**62
