"""Optimisers and learning-rate schedules of DAST.

* Segmentor: SGD (momentum 0.9, weight decay 5e-4), 10x learning rate on the classifier,
  poly decay with power 0.9.
* Discriminators: Adam (betas 0.9, 0.99), same poly decay.
* ``reference`` stage 1: the released parameter generator lists a tensor several times
  (it walks ``modules()`` and yields each module's recursive ``parameters()``); PyTorch
  1.6's SGD then applied k *sequential* updates to a tensor listed k times.
  :class:`SequentialDuplicateSGD` reproduces that explicitly.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from dast.models.segmentor import Segmentor


def poly_lr(base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    """``base_lr * (1 - step / max_steps) ** power``, 0 once ``step >= max_steps``."""
    if step >= max_steps:
        return 0.0
    return base_lr * ((1.0 - float(step) / max_steps) ** power)


def released_parameter_sequence(stages: Sequence[nn.Module]) -> list[Tensor]:
    """The parameter list of the released ``get_1x_lr_params_NOscale``: for each stage,
    for each module in ``stage.modules()``, every trainable tensor of that module's
    recursive ``parameters()``. A tensor appears once per enclosing module."""
    seq: list[Tensor] = []
    for stage in stages:
        for module in stage.modules():
            for p in module.parameters():
                if p.requires_grad:
                    seq.append(p)
    return seq


def multiplicities(seq: Sequence[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Unique tensors of ``seq`` in first-seen order, with how often each is listed."""
    counts = Counter(id(p) for p in seq)
    unique: list[Tensor] = []
    seen: set[int] = set()
    for p in seq:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique, [counts[id(p)] for p in unique]


class SequentialDuplicateSGD(torch.optim.Optimizer):
    """SGD with PyTorch 1.6 semantics for parameters listed several times.

    Each group has ``params`` (unique tensors) and ``multiplicity`` (one int per tensor).
    A tensor with multiplicity k receives k sequential updates per step, each reading
    the value and momentum buffer the previous one left::

        d = g + wd * p;  buf = d on the very first update, else momentum * buf + d;  p -= lr * buf
    """

    def __init__(self, groups: list[dict], lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        for g in groups:
            if len(g["params"]) != len(g["multiplicity"]):
                raise ValueError("each parameter needs a multiplicity")
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, multiplicity=None))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p, k in zip(group["params"], group["multiplicity"]):
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                for _ in range(int(k)):
                    d = g.add(p, alpha=wd) if wd != 0 else g.clone()
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = d.clone()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(mom).add_(d)
                    p.add_(buf, alpha=-lr)
        return None


def segmentor_param_groups(segmentor: Segmentor, lr: float, head_lr_mult: float, duplicate_params: bool) -> list[dict]:
    """Parameter groups of the segmentor: group 0 = backbone (lr), group 1 = classifier
    (lr * mult). ``duplicate_params`` adds each tensor's released multiplicity (see the
    module doc); with ``head_lr_mult == 1`` and no duplicates there is a single group,
    like the released stage 2 (``model.parameters()``)."""
    head = list(segmentor.head_parameters())
    if duplicate_params:
        uniq, mult = multiplicities(released_parameter_sequence(segmentor.stages()))
        return [
            {"params": uniq, "multiplicity": mult, "lr": lr},
            {"params": head, "multiplicity": [1] * len(head), "lr": lr * head_lr_mult},
        ]
    backbone = list(segmentor.backbone_parameters())
    if head_lr_mult == 1.0:
        return [{"params": backbone + head, "lr": lr}]
    return [{"params": backbone, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]


def segmentor_optimizer(
    segmentor: Segmentor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    head_lr_mult: float,
    duplicate_params: bool,
) -> torch.optim.Optimizer:
    """SGD over :func:`segmentor_param_groups` (sequential duplicate updates when asked)."""
    groups = segmentor_param_groups(segmentor, lr, head_lr_mult, duplicate_params)
    if duplicate_params:
        return SequentialDuplicateSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)


def discriminator_optimizer(modules: Iterable[nn.Module | None], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer | None:
    """Adam over the discoverer and corrector parameters (one group), or None without any."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    if not params:
        return None
    return torch.optim.Adam(params, lr=lr, betas=betas)


def set_lrs(opt: torch.optim.Optimizer, base: float, mults: Sequence[float]) -> None:
    """Set group i's learning rate to ``base * mults[i]``."""
    for group, m in zip(opt.param_groups, mults):
        group["lr"] = base * m
