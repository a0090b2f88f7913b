"""ClassMix: the class choice (half of the classes present, ignore excluded), the masks on a
hand-made 2-image label map, and the mixing of images, labels and weights."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from dast.training.online.mixing import choose_half, class_presence, classmix_masks, mix, mixed_weight

# image 0 holds classes 0, 1, 2 and ignored pixels; image 1 holds only class 3
LABELS = torch.tensor(
    [
        [[0, 0, 1, 1], [0, 255, 1, 2], [2, 2, 255, 2]],
        [[3, 3, 3, 3], [3, 3, 3, 3], [3, 3, 3, 3]],
    ]
)


def test_presence_matrix_excludes_the_ignore_index():
    present = class_presence(LABELS, num_classes=5)
    assert present.tolist() == [[True, True, True, False, False], [False, False, False, True, False]]


def test_choose_half_takes_the_lowest_scores_among_present_classes():
    present = torch.tensor([[True, True, False, True], [True, True, True, True], [False] * 4])
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.5], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    chosen = choose_half(present, scores)
    # row 0: 3 present -> ceil(3/2) = 2: classes 1 (0.1) and 3 (0.5); absent class 2 is never chosen
    # row 1: 4 present -> 2: classes 3 and 2; row 2: nothing present -> nothing chosen
    assert chosen.tolist() == [[False, True, False, True], [False, False, True, True], [False] * 4]


def test_classmix_masks_cover_exactly_half_of_each_images_classes():
    for seed in range(20):
        mask = classmix_masks(LABELS, torch.Generator().manual_seed(seed), num_classes=5)
        assert mask.dtype == torch.bool and mask.shape == LABELS.shape
        # image 1 has one class: ceil(1/2) = 1, so all its pixels are pasted
        assert mask[1].all()
        # image 0: the mask is the union of exactly 2 of its 3 classes, never an ignored pixel
        picked = {int(c) for c in LABELS[0][mask[0]].unique()}
        assert len(picked) == 2 and picked <= {0, 1, 2}
        assert torch.equal(mask[0], torch.isin(LABELS[0], torch.tensor(sorted(picked))))
        assert not mask[0][LABELS[0] == 255].any()


def test_classmix_masks_are_fixed_by_the_generator_and_cover_every_pair():
    a = classmix_masks(LABELS, torch.Generator().manual_seed(7), num_classes=5)
    b = classmix_masks(LABELS, torch.Generator().manual_seed(7), num_classes=5)
    assert torch.equal(a, b)
    seen: Counter[tuple[int, ...]] = Counter()
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        mask = classmix_masks(LABELS, g, num_classes=5)
        seen[tuple(sorted(int(c) for c in LABELS[0][mask[0]].unique()))] += 1
    assert set(seen) == set(itertools.combinations((0, 1, 2), 2))
    assert min(seen.values()) > 60  # each pair about 100 of 300 times


def test_mix_images_labels_and_weights():
    mask = torch.tensor([[[True, False], [False, True]]])
    src = torch.full((1, 3, 2, 2), 1.0)
    tgt = torch.full((1, 3, 2, 2), -1.0)
    img = mix(mask, src, tgt)
    assert img[0, :, 0, 0].tolist() == [1.0] * 3 and img[0, :, 0, 1].tolist() == [-1.0] * 3
    # a float B x 1 x H x W mask gives the same result
    assert torch.equal(mix(mask[:, None].float(), src, tgt), img)
    src_label = torch.tensor([[[4, 5], [6, 7]]])
    pseudo = torch.tensor([[[0, 1], [2, 3]]])
    label = mix(mask, src_label, pseudo)
    assert label.tolist() == [[[4, 1], [2, 7]]] and label.dtype == torch.int64
    weight = mixed_weight(mask, torch.full((1, 2, 2), 0.25))
    assert weight.tolist() == [[[1.0, 0.25], [0.25, 1.0]]]
    with pytest.raises(ValueError, match=r"cannot mix shapes \(1, 2, 2\) and \(1, 3, 3\)"):
        mix(mask, src_label, torch.zeros(1, 3, 3, dtype=torch.long))
