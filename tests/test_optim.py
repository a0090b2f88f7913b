"""Optimisers: the released duplicated-parameter SGD, parameter groups, poly schedule."""

from __future__ import annotations

import math

import pytest
import torch

from dast.models import build_segmentor
from dast.training.optim import (
    SequentialDuplicateSGD,
    multiplicities,
    poly_lr,
    released_parameter_sequence,
    segmentor_optimizer,
)


def test_poly_lr() -> None:
    assert poly_lr(1.0, 0, 100) == 1.0
    assert math.isclose(poly_lr(2.5e-4, 150000, 250000, 0.9), 2.5e-4 * 0.4**0.9)
    assert poly_lr(1.0, 100, 100) == 0.0 and poly_lr(1.0, 150, 100) == 0.0


def test_released_resnet101_parameter_list_multiplicities() -> None:
    seg = build_segmentor("resnet101", 19, "reference")
    seq = released_parameter_sequence(seg.stages())
    unique, mult = multiplicities(seq)
    assert (
        len(seq) == 318 and len(unique) == 105
    )  # the released generator: 318 entries for 105 tensors (docs/variants.md)
    names = {id(p): n for n, p in seg.named_parameters()}
    for p, k in zip(unique, mult):
        n = names[id(p)]
        if n == "encoder.conv1.weight":
            assert k == 1
        elif ".downsample." in n:
            assert k == 4, n
        else:
            assert k == 3, n


def _by_hand(p: float, g: float, k: int, steps: int, lr: float, mom: float, wd: float) -> float:
    buf = None
    for _ in range(steps):
        for _ in range(k):
            d = g + wd * p
            buf = d if buf is None else mom * buf + d
            p = p - lr * buf
    return p


@pytest.mark.parametrize("k", [1, 3, 4])
def test_sequential_duplicate_sgd_matches_hand_computation(k: int) -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = SequentialDuplicateSGD(
        [{"params": [p], "multiplicity": [k], "lr": 0.1}], lr=0.1, momentum=0.9, weight_decay=0.1
    )
    for _ in range(2):
        p.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
        opt.step()
    for i, (p0, g) in enumerate(((1.0, 0.5), (-2.0, 0.25))):
        assert math.isclose(p[i].item(), _by_hand(p0, g, k, 2, 0.1, 0.9, 0.1), rel_tol=1e-12)


def test_multiplicity_one_equals_torch_sgd() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    o1 = SequentialDuplicateSGD([{"params": [a], "multiplicity": [1]}], lr=0.05, momentum=0.9, weight_decay=5e-4)
    o2 = torch.optim.SGD([b], lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=False)
    for _ in range(3):
        g = torch.randn(5, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_groups_paper_and_reference() -> None:
    seg = build_segmentor("small", 3, "paper")
    opt = segmentor_optimizer(seg, lr=1.0, momentum=0.9, weight_decay=0.0, head_lr_mult=10.0, duplicate_params=False)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 10.0]
    assert len(opt.param_groups[1]["params"]) == 8  # 4 ASPP convs (weight, bias)
    one = segmentor_optimizer(seg, lr=1.0, momentum=0.9, weight_decay=0.0, head_lr_mult=1.0, duplicate_params=False)
    assert len(one.param_groups) == 1
    ref = segmentor_optimizer(
        build_segmentor("small", 3, "reference"),
        lr=1.0,
        momentum=0.9,
        weight_decay=0.0,
        head_lr_mult=10.0,
        duplicate_params=True,
    )
    assert isinstance(ref, SequentialDuplicateSGD)
    assert set(ref.param_groups[0]["multiplicity"]) == {1, 3, 4}
