"""ImageNet feature distance: the downscaled-label rule and the masked L2 loss, by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dast.training.online.feature_distance import (
    THING_CLASSES,
    downscale_labels,
    feature_distance_loss,
    frozen_copy,
)


def test_downscaled_label_needs_three_quarters_of_the_patch():
    labels = torch.tensor(
        [
            [
                [1, 1, 2, 2, 1, 2],
                [1, 1, 2, 3, 2, 1],
                [255, 255, 5, 5, 0, 0],
                [255, 1, 5, 255, 0, 0],
            ]
        ]
    )
    small = downscale_labels(labels, (2, 3), num_classes=6)
    # patches: all 1 -> 1; three 2 and one 3 -> 2 (0.75 counts); two 1 and two 2 -> ignored;
    # three ignored and one 1 -> ignored; three 5 and one ignored -> 5; all 0 -> 0
    assert small.tolist() == [[[1, 2, 255], [255, 5, 0]]]
    assert downscale_labels(labels, (2, 3), num_classes=6, min_ratio=0.5).tolist() == [[[1, 2, 1], [255, 5, 0]]]


def test_downscaling_uneven_sizes_uses_overlapping_patches():
    labels = torch.tensor([[[1], [1], [2]]])  # 3 x 1 -> 2 x 1: rows [0, 2) and [1, 3)
    assert downscale_labels(labels, (2, 1), num_classes=3).tolist() == [[[1], [255]]]


def test_downscaling_matches_average_pooling_when_the_size_divides():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 12), generator=g)
    labels[labels == 2] = 255
    onehot = F.one_hot(torch.where(labels == 255, 2, labels), 3).permute(0, 3, 1, 2).float()
    ratio, arg = F.avg_pool2d(onehot, 4).max(dim=1)
    want = torch.where((arg < 2) & (ratio >= 0.75), arg, torch.full_like(arg, 255))
    assert torch.equal(downscale_labels(labels, (2, 3), num_classes=2), want)


def test_loss_is_the_weighted_mean_distance_over_thing_pixels():
    # two feature pixels: (3, 4) and (0, 1) against zeros -> distances 5 and 1
    feats = torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]], requires_grad=True)  # 1 x 2 x 1 x 2
    frozen = torch.zeros(1, 2, 1, 2)
    car, road = 13, 0
    left_thing = torch.tensor([[[car, car, road, road], [car, car, road, road]]])
    loss = feature_distance_loss(feats, frozen, left_thing, weight=0.005)
    assert loss.item() == pytest.approx(0.005 * 5.0)
    both = torch.full((1, 2, 4), car)
    assert feature_distance_loss(feats, frozen, both, weight=0.005).item() == pytest.approx(0.005 * 3.0)
    none = torch.full((1, 2, 4), road)
    assert feature_distance_loss(feats, frozen, none).item() == 0.0  # no NaN on an empty selection
    loss.backward()
    assert feats.grad is not None
    # d||v||/dv = v / ||v|| on the masked pixel, scaled by weight / count
    assert feats.grad[0, :, 0, 0].tolist() == pytest.approx([0.005 * 3 / 5, 0.005 * 4 / 5])
    assert feats.grad[0, :, 0, 1].tolist() == [0.0, 0.0]


def test_loss_has_a_finite_gradient_when_the_features_still_agree():
    feats = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.full((2, 12, 12), THING_CLASSES[0])
    loss = feature_distance_loss(feats, feats.detach().clone(), labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(feats.grad).all()
    with pytest.raises(ValueError, match="feature shapes differ"):
        feature_distance_loss(feats, torch.zeros(2, 4, 3, 4), labels)


def test_frozen_copy_is_a_detached_eval_mode_copy():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1)).train()
    frozen = frozen_copy(net)
    assert not frozen.training and net.training
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert frozen[0].weight.data_ptr() != net[0].weight.data_ptr()
