"""Splitting work across the processes of a data-parallel run."""

from __future__ import annotations


def shard(length: int, rank: int, world_size: int) -> list[int] | None:
    """The indices of ``range(length)`` that process ``rank`` of ``world_size`` handles
    (every ``world_size``-th, starting at ``rank``); ``None`` (everything) for one process."""
    if world_size <= 1:
        return None
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(range(rank, length, world_size))
