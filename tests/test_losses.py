"""Loss values against numbers computed by hand."""

from __future__ import annotations

import math

import torch

from dast import losses


def test_cross_entropy_ignores_255_by_hand() -> None:
    logits = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])  # N=1, C=2, H=1, W=2
    labels = torch.tensor([[[1, 255]]])
    # pixel 0: logits (0, 1), label 1 -> -log(e^1 / (e^0 + e^1))
    expected = -math.log(math.e / (1 + math.e))
    assert math.isclose(losses.cross_entropy(logits, labels).item(), expected, rel_tol=1e-6)


def test_cross_entropy_all_ignored_is_zero_not_nan() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = losses.cross_entropy(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_segmentation_loss_upsamples_align_corners() -> None:
    logits = torch.tensor([[[[0.0, 2.0]], [[0.0, 0.0]]]])  # 1x2x1x2
    labels = torch.tensor([[[0, 0, 0]]])  # width 3: middle pixel interpolates to (1, 0)
    vals = [0.0, 1.0, 2.0]
    expected = sum(-math.log(math.exp(v) / (math.exp(v) + 1.0)) for v in vals) / 3
    assert math.isclose(losses.segmentation_loss(logits, labels).item(), expected, rel_tol=1e-6)


def test_lsgan_by_hand() -> None:
    out = torch.tensor([0.5, -1.0, 2.0])
    assert math.isclose(losses.lsgan_loss(out, 0.0).item(), (0.25 + 1.0 + 4.0) / 3, rel_tol=1e-6)
    assert math.isclose(losses.lsgan_loss(out, 1.0).item(), (0.25 + 4.0 + 1.0) / 3, rel_tol=1e-6)
    w = torch.tensor([1.0, 0.0, 0.5])
    assert math.isclose(losses.lsgan_loss(out, 1.0, w).item(), (0.25 + 0.0 + 0.5) / 3, rel_tol=1e-6)


def test_bce_by_hand() -> None:
    out = torch.tensor([0.0, 2.0])
    # target 1: -log(sigmoid(x)); target 0: -log(1 - sigmoid(x))
    e1 = (math.log(2.0) + math.log(1 + math.exp(-2.0))) / 2
    e0 = (math.log(2.0) + math.log(1 + math.exp(2.0))) / 2
    assert math.isclose(losses.bce_adversarial_loss(out, 1.0).item(), e1, rel_tol=1e-6)
    assert math.isclose(losses.bce_adversarial_loss(out, 0.0).item(), e0, rel_tol=1e-6)
    assert math.isclose(losses.adversarial_loss("bce", out, 0.0).item(), e0, rel_tol=1e-6)


def test_attention_weighted_corrector_loss_by_hand() -> None:
    c_out = torch.tensor([[[[1.0, 2.0]]]])  # 1x1x1x2
    alpha = torch.tensor([[[[0.5, 0.5, 1.0, 1.0]]]])  # resized (align_corners) to width 2 -> (0.5, 1.0)
    expected = (0.5 * 1.0 + 1.0 * 4.0) / 2
    got = losses.attention_weighted_corrector_loss("lsgan", c_out, 0.0, alpha)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_weight_is_detached() -> None:
    alpha = torch.rand(1, 1, 4, 4, requires_grad=True)
    out = torch.rand(1, 1, 2, 2, requires_grad=True)
    losses.attention_weighted_corrector_loss("lsgan", out, 0.0, alpha).backward()
    assert alpha.grad is None and out.grad is not None
