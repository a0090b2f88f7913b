"""The update policy: whether, and how, one iteration's gradients become an update.

Every policy is called like a step function, ``policy(ctx, batch, adv_scale)``, and
returns an :class:`Update`. It owns everything between the losses and the parameters:

* the skip-or-apply decision: a non-finite loss skips both optimiser steps, and under
  DDP every rank takes the same decision (:func:`all_ranks_agree`, one scalar all-reduce);
* loss scaling (fp16), unscaling, the optimiser steps and the scale's update;
* its own state (``state_dict`` / ``load_state_dict``, kept in checkpoints).

Three forms:

* :class:`PlainUpdate` — fp32/bf16: :func:`train_step`;
* :class:`ScaledUpdate` — fp16 with ``torch.amp.GradScaler``: every loss is scaled before
  its backward, one check guards both updates, an overflow with finite losses is the
  scaler's own skip (not a fault) and a scale below :data:`MIN_LOSS_SCALE` stops the run;
* :class:`dast.training.graphs.GraphedUpdate` — the iteration replayed from CUDA graphs.

:func:`dast.training.engine.choose_update` picks the form from the runtime's levers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from dast.errors import NumericalFault
from dast.training.step import Batch, StepContext, apply_updates, compute_gradients, losses_finite, zero_grads

# fp16: a loss scale below this (fp16's smallest subnormal, 2^-24) cannot bring the
# gradients into range: every step would be skipped
MIN_LOSS_SCALE = 2.0**-24


@dataclass
class Update:
    """What one iteration did: its scalars, whether the optimisers stepped and, for a
    skip that is not a fault (an fp16 overflow with finite losses), why."""

    scalars: dict[str, Tensor]
    applied: bool
    overflow: bool = False
    note: str | None = None


class UpdatePolicy(Protocol):
    """One iteration from gradients to update; see the module docstring."""

    name: str

    def __call__(self, ctx: StepContext, batch: Batch, adv_scale: float | None) -> Update: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def reset(self) -> None: ...


def needs_loss_scaling(amp_dtype: torch.dtype | None) -> bool:
    """fp16 autocast needs :class:`ScaledUpdate`, which a captured CUDA graph cannot run."""
    return amp_dtype == torch.float16


def all_ranks_agree(flag: Tensor) -> bool:
    """``flag`` (a boolean tensor) AND-ed over the ranks of the process group (one scalar
    all-reduce under DDP; no communication otherwise), so that every rank skips or applies
    the same steps: a non-finite loss on one rank makes every rank's gradients non-finite."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        agreed = flag.to(torch.int32).reshape(1)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        return bool(agreed.item())
    return bool(flag)


def train_step(
    ctx: StepContext, batch: Batch, adv_scale: Tensor | float | None = None, *, check_finite: bool = True
) -> tuple[dict[str, Tensor], bool]:
    """Run one iteration. Returns (detached scalars for logging, whether it was applied).

    When ``check_finite`` and any loss is NaN or infinite on any rank, no parameter is
    updated and the second value is False (this check reads one flag back to the host).
    """
    out, disc_active = compute_gradients(ctx, batch, adv_scale)
    if check_finite and not all_ranks_agree(losses_finite(out)):
        zero_grads(ctx)
        return out, False
    apply_updates(ctx, disc_active)
    return out, True


class _Stateless:
    """No state to checkpoint, nothing captured to reset."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def reset(self) -> None:
        pass


class PlainUpdate(_Stateless):
    """fp32 or bf16: :func:`train_step`."""

    name = "train_step"

    def __call__(self, ctx: StepContext, batch: Batch, adv_scale: float | None) -> Update:
        return Update(*train_step(ctx, batch, adv_scale))


def _grad_scaler(device: torch.device) -> Any:
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()  # torch < 2.3


class ScaledUpdate:
    """fp16: losses scaled before each backward, gradients unscaled, one check for both
    optimisers. A step whose losses are finite but whose gradients overflow is skipped and
    halves the scale (``Update.overflow``); a scale below :data:`MIN_LOSS_SCALE` raises
    :class:`NumericalFault`. A non-finite loss is a fault like in :class:`PlainUpdate`."""

    name = "train_step+GradScaler"

    def __init__(self, device: torch.device) -> None:
        self.scaler = _grad_scaler(device)

    @property
    def scale(self) -> float:
        return float(self.scaler.get_scale())

    def __call__(self, ctx: StepContext, batch: Batch, adv_scale: float | None) -> Update:
        scaler = self.scaler
        out, disc_active = compute_gradients(ctx, batch, adv_scale, loss_scale=scaler.scale)
        opts = [ctx.seg_opt] + ([ctx.disc_opt] if ctx.disc_opt is not None and disc_active else [])
        for opt in opts:
            scaler.unscale_(opt)
        grads = [p.grad for opt in opts for g in opt.param_groups for p in g["params"] if p.grad is not None]
        loss_flag = losses_finite(out)
        grads_ok = torch.stack([g.isfinite().all() for g in grads]).all() if grads else torch.ones_like(loss_flag)
        losses_ok = all_ranks_agree(loss_flag)  # every rank decides alike under DDP
        if losses_ok and all_ranks_agree(grads_ok):
            for opt in opts:
                scaler.step(opt)
            scaler.update()
            return Update(out, True)
        zero_grads(ctx)
        scaler.update()  # unscale_ recorded the overflow: the scale goes down
        if not losses_ok:
            return Update(out, False)  # a numerical fault: the fault policy judges it
        if self.scale < MIN_LOSS_SCALE:
            raise NumericalFault(
                f"the fp16 loss scale fell to {self.scale:g} (below {MIN_LOSS_SCALE:g}): "
                "the gradients overflow at any scale; train in bf16 or fp32"
            )
        return Update(
            out, False, overflow=True, note=f"fp16 gradients overflowed; skipped, loss scale now {self.scale:g}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])  # resume at the scale reached

    def reset(self) -> None:
        pass
