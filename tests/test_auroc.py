"""AUROC against hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dast.evaluation.auroc import auroc


def test_perfect_inverse_and_chance_rankings() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0])) == 0.0
    assert auroc(np.full(6, 0.3), np.array([1, 0, 1, 0, 1, 0])) == 0.5  # a constant score finds nothing


def test_hand_counted_pairs_with_ties() -> None:
    # positives 0.9, 0.5, 0.3; negatives 0.5, 0.2: of the 6 pairs, 0.9 beats both, 0.5 ties one
    # and beats one, 0.3 beats one and loses one -> (2 + 1.5 + 1) / 6
    scores = np.array([0.9, 0.5, 0.3, 0.5, 0.2])
    labels = np.array([True, True, True, False, False])
    assert auroc(scores, labels) == pytest.approx(4.5 / 6)


def test_matches_the_pairwise_definition_on_random_data() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        pos.size * neg.size
    )
    assert auroc(s, y) == pytest.approx(pairwise, abs=1e-12)


def test_empty_class_and_shape_mismatch() -> None:
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([True, True])))
    with pytest.raises(ValueError, match="differ in size"):
        auroc(np.zeros(3), np.zeros(4, dtype=bool))
