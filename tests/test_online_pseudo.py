"""The teacher's pseudo labels, the batch confidence weight (with ignored rows) and the
weighted cross-entropy, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dast.losses import cross_entropy
from dast.training.online.pseudo import teacher_targets, weighted_cross_entropy


def _two_class_logits(margins: list[list[list[float]]]) -> torch.Tensor:
    """B x 2 x H x W logits with class-0 logit 0 and class-1 logit ``margin``."""
    m = torch.tensor(margins)
    return torch.stack([torch.zeros_like(m), m], dim=1)


def test_labels_are_the_argmax_and_the_weight_the_share_of_confident_pixels():
    # softmax of (0, 4) gives 0.982 >= 0.968; (0, 3) 0.953 and (0, -2) 0.881 fall below;
    # (0, -5) gives 0.993 for class 0
    logits = _two_class_logits([[[4.0, 3.0], [-2.0, -5.0]], [[4.0, 4.0], [0.5, 3.0]]])
    labels, weight = teacher_targets(logits)
    assert labels.tolist() == [[[1, 1], [0, 0]], [[1, 1], [1, 1]]]
    assert labels.dtype == torch.int64
    # confident: image 0 -> 2 of 4 pixels, image 1 -> 2 of 4: one share for the batch, 4/8
    assert weight.dtype == torch.float32 and weight.shape == (2, 2, 2)
    assert torch.equal(weight, torch.full((2, 2, 2), 0.5))


def test_the_weight_counts_a_confidence_equal_to_the_threshold():
    logits = _two_class_logits([[[0.0, 4.0]]])  # confidences exactly 0.5 and 0.982
    _, weight = teacher_targets(logits, threshold=0.5)
    assert weight.tolist() == [[[1.0, 1.0]]]
    labels, weight = teacher_targets(logits, threshold=0.5 + 1e-6)
    assert weight.tolist() == [[[0.5, 0.5]]]
    assert labels.tolist() == [[[0, 1]]]  # a tie goes to the first class


def test_ignored_rows_get_weight_zero_after_the_share_is_computed():
    margins = [[[5.0], [5.0], [0.0], [0.0], [5.0]]]  # 5 rows, 1 column: 3 of 5 confident
    _, weight = teacher_targets(_two_class_logits(margins), ignore_top=1, ignore_bottom=2)
    assert weight[0, :, 0].tolist() == pytest.approx([0.0, 0.6, 0.6, 0.0, 0.0])
    _, weight = teacher_targets(_two_class_logits(margins), ignore_top=3, ignore_bottom=4)
    assert weight.abs().sum().item() == 0.0  # the rows overlap: everything ignored
    with pytest.raises(ValueError, match="must be >= 0, got -1 and 0"):
        teacher_targets(_two_class_logits(margins), ignore_top=-1)


def test_targets_upsample_the_logits_to_the_requested_size():
    logits = _two_class_logits([[[4.0]]])  # 1 x 2 x 1 x 1
    labels, weight = teacher_targets(logits, size=(2, 3))
    assert labels.shape == (1, 2, 3) and labels.unique().tolist() == [1]
    assert torch.equal(weight, torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="must be B x C x H x W"):
        teacher_targets(torch.zeros(2, 3, 4))


def test_weighted_cross_entropy_is_the_mean_over_all_pixels_with_ignored_ones_counted():
    # p(class 1) = 3/4 everywhere: CE = ln(4/3) for label 1 and ln(4) for label 0
    logits = _two_class_logits([[[math.log(3.0)] * 2] * 2])
    labels = torch.tensor([[[1, 0], [255, 1]]])
    weight = torch.tensor([[[1.0, 0.5], [1.0, 2.0]]])
    loss = weighted_cross_entropy(logits, labels, weight)
    expected = (math.log(4 / 3) * 1.0 + math.log(4.0) * 0.5 + 0.0 + math.log(4 / 3) * 2.0) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_with_unit_weights_is_the_plain_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 3, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 6, 8), generator=g)  # twice the logits' size: upsampled
    ours = weighted_cross_entropy(logits, labels, torch.ones(2, 6, 8))
    plain = cross_entropy(torch.nn.functional.interpolate(logits, (6, 8), mode="bilinear", align_corners=True), labels)
    assert ours.item() == pytest.approx(plain.item(), rel=1e-6)
    ours.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match=r"labels \(2, 6, 8\) and weight \(2, 6\) differ in shape"):
        weighted_cross_entropy(logits, labels, torch.ones(2, 6))
