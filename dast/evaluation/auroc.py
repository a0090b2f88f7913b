"""Area under the ROC curve: how well a score ranks positives above negatives."""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """AUROC of ``scores`` for the boolean labels ``positives`` (same shape): the probability
    that a random positive scores higher than a random negative, ties counting one half.

    Computed exactly from average ranks (the Mann-Whitney U statistic): 0.5 means the score
    finds nothing, 1.0 that every positive outranks every negative. NaN when either class
    is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=bool).ravel()
    if s.shape != pos.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} and {pos.shape}")
    n_pos = int(pos.sum())
    n_neg = s.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # the average rank (1-based) of each distinct value, ties sharing the mean of their ranks
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
