"""Every optimiser of DAST, its parameter groups and the learning-rate schedule.

* Segmentor: SGD (momentum 0.9, weight decay 5e-4), 10x learning rate on the classifier,
  poly decay with power 0.9.
* Discriminators: Adam (betas 0.9, 0.99), same poly decay.
* ``reference`` stage 1: the released parameter generator lists a tensor several times
  (it walks ``modules()`` and yields each module's recursive ``parameters()``); PyTorch
  1.6's SGD then applied k *sequential* updates to a tensor listed k times.
  :class:`SequentialDuplicateSGD` reproduces that explicitly.

Two families, chosen by :func:`build_optimizers`:

* ``released``: ``torch.optim.SGD`` (or :class:`SequentialDuplicateSGD` for the released
  duplicated list) and ``torch.optim.Adam``, the eager default;
* ``foreach``: :class:`ForeachSGD` (multi-tensor kernels, also for the duplicated list,
  the same bits as the released ones with float learning rates on the CPU) and
  :class:`CapturableAdam` (step count and learning rate in device tensors). With
  ``tensor_lr`` both read their learning rates from device tensors, so a CUDA graph that
  captured their step follows the schedule.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dast.models.segmentor import Segmentor
from dast.training.graphs import capturing


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
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closures: the base class takes one
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


def discriminator_optimizer(
    modules: Iterable[nn.Module | None], lr: float, betas: tuple[float, float]
) -> torch.optim.Optimizer | None:
    """Adam over the discoverer and corrector parameters (one group), or None without any."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    if not params:
        return None
    return torch.optim.Adam(params, lr=lr, betas=betas)


def set_lrs(opt: torch.optim.Optimizer, base: float, mults: Sequence[float]) -> None:
    """Set group i's learning rate to ``base * mults[i]``."""
    for group, m in zip(opt.param_groups, mults):
        group["lr"] = base * m


# ---------------------------------------------------------------------------------------
# Multi-tensor and graph-capturable optimisers


class _TensorLR:
    """Mix-in: a 0-dim device tensor per parameter group mirroring ``group["lr"]``.

    ``group["lr"]`` stays a float (schedules, state dicts and JSON checkpoints see the
    usual value); :meth:`load_lr` copies it into the tensors without a host sync.
    """

    param_groups: list[dict[str, Any]]

    def _init_lr_tensors(self) -> None:
        self._lr_tensors: list[Tensor] = []

    def _lr_tensor(self, index: int) -> Tensor:
        while len(self._lr_tensors) <= index:
            group = self.param_groups[len(self._lr_tensors)]
            dev = group["params"][0].device if group["params"] else torch.device("cpu")
            self._lr_tensors.append(torch.zeros((), dtype=torch.float32, device=dev))
        return self._lr_tensors[index]

    def load_lr(self) -> None:
        """Copy every group's float learning rate into its device tensor (no host sync)."""
        for i, group in enumerate(self.param_groups):
            self._lr_tensor(i).fill_(float(group["lr"]))


def _check_warm(state: dict[str, Any], key: str) -> None:
    if key not in state and capturing():
        raise RuntimeError("optimiser state must exist before CUDA-graph capture: run eager steps first")


class ForeachSGD(_TensorLR, torch.optim.Optimizer):
    """SGD (momentum, weight decay, no dampening) as multi-tensor kernels.

    A group may carry ``multiplicity`` (one int per parameter, default 1): a tensor with
    multiplicity k receives k sequential updates per step with the same gradient, as the
    released stage-1 parameter list did (see :class:`~dast.training.optim.SequentialDuplicateSGD`).
    Round r updates every tensor with k >= r in one foreach call::

        d = g + wd * p;  buf = momentum * buf + d  (buf starts at 0, i.e. buf = d first);  p -= lr * buf

    ``tensor_lr``: read the learning rates from device tensors (:meth:`load_lr`, done at
    the start of every eager step), so a captured step follows the schedule. With float
    learning rates the kernels are those of ``torch.optim.SGD(foreach=True)``.
    """

    def __init__(
        self,
        groups: Iterable[dict[str, Any]] | Iterable[Tensor],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        *,
        tensor_lr: bool = False,
    ) -> None:
        listed: list[Any] = list(groups)
        dicts: list[dict[str, Any]] = [{"params": listed}] if listed and isinstance(listed[0], Tensor) else listed
        for g in dicts:
            g["params"] = list(g["params"])
            mult = g.setdefault("multiplicity", [1] * len(g["params"]))
            if len(mult) != len(g["params"]) or any(int(k) < 1 for k in mult):
                raise ValueError("each parameter needs a multiplicity >= 1")
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight decay must be >= 0")
        super().__init__(dicts, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, multiplicity=None))
        self.tensor_lr = tensor_lr
        self._init_lr_tensors()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closures: the base class takes one
        if self.tensor_lr and not capturing():
            self.load_lr()
        for gi, group in enumerate(self.param_groups):
            mom, wd = float(group["momentum"]), float(group["weight_decay"])
            items = [(p, int(k)) for p, k in zip(group["params"], group["multiplicity"]) if p.grad is not None]
            if not items:
                continue
            bufs = []
            for p, _ in items:
                state = self.state[p]
                if mom != 0:
                    _check_warm(state, "momentum_buffer")
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    bufs.append(state["momentum_buffer"])
            lr_t = self._lr_tensor(gi) if self.tensor_lr else None
            for r in range(1, max(k for _, k in items) + 1):
                sel = [i for i, (_, k) in enumerate(items) if k >= r]
                params = [items[i][0] for i in sel]
                grads = [items[i][0].grad for i in sel]
                d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else [g.clone() for g in grads]
                if mom != 0:
                    b = [bufs[i] for i in sel]
                    torch._foreach_mul_(b, mom)
                    torch._foreach_add_(b, d)
                    d = b
                if lr_t is None:
                    torch._foreach_add_(params, d, alpha=-float(group["lr"]))
                else:
                    torch._foreach_sub_(params, torch._foreach_mul(d, lr_t))
        return None


class CapturableAdam(_TensorLR, torch.optim.Optimizer):
    """Adam (no weight decay) whose step count and learning rate live in device tensors.

    State per parameter is ``step`` (float32, 0-dim, on the parameter's device),
    ``exp_avg`` and ``exp_avg_sq``, as in ``torch.optim.Adam``::

        m = lerp(m, g, 1 - b1);  v = b2 * v + (1 - b2) * g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0))
        self._init_lr_tensors()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closures: the base class takes one
        if not capturing():
            self.load_lr()
        for gi, group in enumerate(self.param_groups):
            b1, b2 = (float(b) for b in group["betas"])
            eps = float(group["eps"])
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            steps, m, v = [], [], []
            for p in params:
                state = self.state[p]
                _check_warm(state, "step")
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:  # loaded from a checkpoint on the CPU
                    state["step"] = state["step"].to(p.device, torch.float32)
                steps.append(state["step"])
                m.append(state["exp_avg"])
                v.append(state["exp_avg_sq"])
            torch._foreach_add_(steps, 1.0)
            torch._foreach_lerp_(m, grads, 1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
            bc1 = torch._foreach_pow(b1, steps)  # b1^t
            torch._foreach_sub_(bc1, 1.0)  # b1^t - 1 (negative)
            torch._foreach_reciprocal_(bc1)
            neg_step = torch._foreach_mul(bc1, self._lr_tensor(gi))  # -lr / (1 - b1^t)
            bc2 = torch._foreach_pow(b2, steps)
            torch._foreach_neg_(bc2)
            torch._foreach_add_(bc2, 1.0)
            torch._foreach_sqrt_(bc2)  # sqrt(1 - b2^t)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(m, denom)
            torch._foreach_mul_(update, neg_step)
            torch._foreach_add_(params, update)
        return None


OPTIMIZER_FAMILIES = ("released", "foreach")


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """The hyper-parameters of a stage's two optimisers (from the config and the stage plan)."""

    lr: float
    momentum: float
    weight_decay: float
    head_lr_mult: float
    duplicate_params: bool
    lr_d: float
    betas: tuple[float, float]


def build_optimizers(
    segmentor: Segmentor,
    discriminators: Sequence[nn.Module | None],
    settings: OptimizerSettings,
    *,
    family: str,
    tensor_lr: bool = False,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """(segmentor optimiser, discriminator optimiser or None) of ``family`` over the
    parameter groups of :func:`segmentor_param_groups`; both families have the same update
    rules and state keys, so a checkpoint of one resumes in the other."""
    if family not in OPTIMIZER_FAMILIES:
        raise ValueError(f"unknown optimiser family {family!r}; choose one of {', '.join(OPTIMIZER_FAMILIES)}")
    s = settings
    if family == "released":
        seg_opt = segmentor_optimizer(
            segmentor,
            lr=s.lr,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
            head_lr_mult=s.head_lr_mult,
            duplicate_params=s.duplicate_params,
        )
        return seg_opt, discriminator_optimizer(discriminators, s.lr_d, s.betas)
    groups = segmentor_param_groups(segmentor, s.lr, s.head_lr_mult, s.duplicate_params)
    fseg = ForeachSGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, tensor_lr=tensor_lr)
    dparams = [p for m in discriminators if m is not None for p in m.parameters()]
    return fseg, (CapturableAdam(dparams, lr=s.lr_d, betas=s.betas) if dparams else None)
