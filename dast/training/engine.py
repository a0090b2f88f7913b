"""The engine of one stage: its optimisers, its step function and its schedule.

``Engine.build(plan, cfg, nets, runtime)`` is the one place that turns a config into
something that trains: ``dast train`` (through :mod:`dast.training.loop`) and ``dast bench``
(through :mod:`dast.benchmarking.modes`) both call it, so they run the same optimisers and
the same step function for the same config. It owns

* the optimisers, ``standard`` or ``foreach`` / graph-capturable (:mod:`dast.training.optim`),
  as the runtime's levers say (:mod:`dast.training.levers`);
* the step function: :func:`dast.training.step.train_step`, or its CUDA-graph replay
  (:class:`dast.training.graphs.GraphedStep`);
* the poly learning-rate schedule (``set_lr``) and the optional adversarial warm-up;
* fp16 gradient scaling (``runtime.amp: fp16``), through ``torch.amp.GradScaler``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from dast.config import Config
from dast.models.io import Networks
from dast.training.graphs import GraphedStep
from dast.training.optim import build_optimizers, poly_lr, set_lrs
from dast.training.runtime import Runtime
from dast.training.step import (
    Autocast,
    StepModels,
    StepSettings,
    all_ranks_agree,
    compute_gradients,
    losses_finite,
    train_step,
)


class StepFn(Protocol):
    """The signature of :func:`~dast.training.step.train_step`."""

    def __call__(
        self,
        models: StepModels,
        seg_opt: torch.optim.Optimizer,
        disc_opt: torch.optim.Optimizer | None,
        source_images: Tensor,
        source_labels: Tensor,
        target_images: Tensor,
        target_labels: Tensor | None,
        settings: StepSettings,
        autocast: Autocast,
        check_finite: bool = True,
        *,
        adv_scale: Tensor | float | None = None,
    ) -> tuple[dict[str, Tensor], bool]: ...


@dataclass
class StagePlan:
    """What one stage trains."""

    name: str  # "stage1", "round1", ...
    index: int  # 0 for stage 1, k for round k
    steps: int
    poly_steps: int
    lr: float
    head_lr_mult: float
    duplicate_params: bool
    adversarial: bool
    mu: float = 1.0
    pseudo_dir: Path | None = None
    global_offset: int = 0  # iterations done by earlier stages (for plots)
    lr_mult: float = 1.0  # learning-rate scaling for data-parallel runs (distributed.lr_scaling)
    batchnorm: str = "train"  # "frozen": the networks train in eval mode (released self-training)
    eval_every: int | None = None  # evaluation cadence (None: train.eval_every)


@dataclass(frozen=True)
class AdversarialWarmup:
    """The segmentor's adversarial terms are 0 for the first ``start`` iterations, then
    grow linearly to full weight over ``ramp`` iterations (an addition to the paper)."""

    start: int
    ramp: int

    def scale(self, step: int) -> float:
        """The factor at 0-based iteration ``step``: 0 before ``start``, then
        min(1, (step - start + 1) / ramp), or 1 without a ramp."""
        if step < self.start:
            return 0.0
        if self.ramp <= 0:
            return 1.0
        return min(1.0, (step - self.start + 1) / self.ramp)


@dataclass(frozen=True)
class Schedule:
    """The poly learning rates of a stage."""

    lr: float
    lr_d: float
    poly_steps: int
    power: float
    group_mults: tuple[float, ...]

    def at(self, step: int, scale: float = 1.0) -> tuple[float, float]:
        """(segmentor, discriminator) base learning rates at ``step``."""
        return (
            poly_lr(self.lr * scale, step, self.poly_steps, self.power),
            poly_lr(self.lr_d * scale, step, self.poly_steps, self.power),
        )


@dataclass
class StepResult:
    """What one iteration returned, with the learning rates it ran at."""

    scalars: dict[str, Tensor]
    applied: bool
    lr: float
    lr_d: float
    overflow: bool = False  # fp16: finite losses, overflowing gradients; the GradScaler skipped the update


def step_settings(cfg: Config, plan: StagePlan) -> StepSettings:
    """The :class:`StepSettings` of a stage."""
    adv = cfg.adversarial
    weighting = adv.corrector_weighting or "none"
    return StepSettings(
        adv_loss=adv.loss,
        lambda_d=adv.lambda_d,
        lambda_c=adv.lambda_c,
        attention=adv.attention,
        weight_segmentor_adv=weighting in ("segmentor", "both"),
        weight_corrector_adv=weighting in ("corrector", "both"),
        reuse_discoverer=cfg.train.reuse_discoverer,
        mu=plan.mu,
        adversarial=plan.adversarial,
        forward_target=cfg.train.forward_target,
    )


def adversarial_warmup(cfg: Config, plan: StagePlan) -> AdversarialWarmup | None:
    """The warm-up of stage 1 when the config asks for one (rounds never warm up)."""
    adv = cfg.adversarial
    if plan.index != 0 or not plan.adversarial or (adv.warmup_steps == 0 and adv.warmup_ramp == 0):
        return None
    return AdversarialWarmup(adv.warmup_steps, adv.warmup_ramp)


@dataclass
class Engine:
    """Optimisers, step function and schedule of one stage; see the module docstring."""

    plan: StagePlan
    runtime: Runtime
    models: StepModels
    seg_opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer | None
    settings: StepSettings
    schedule: Schedule
    step_fn: StepFn
    graphed: GraphedStep | None = None
    warmup: AdversarialWarmup | None = None
    scaler: Any = None  # torch.amp.GradScaler under fp16
    lr_scale: float = 1.0
    _adv_scale: Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        plan: StagePlan,
        cfg: Config,
        nets: Networks,
        runtime: Runtime,
        *,
        wrap: Callable[[Networks], StepModels] | None = None,
        log: logging.Logger | None = None,
        graph_warmup: int = 3,
    ) -> Engine:
        """The engine of ``plan`` for ``nets`` on ``runtime`` (``wrap``: the DDP wrapping)."""
        tr, adv, levers = cfg.train, cfg.adversarial, runtime.levers
        if log is not None and cfg.runtime.cuda_graphs and not levers.cuda_graphs:
            log.warning(
                "%s: runtime.cuda_graphs needs a single CUDA device (device %s, %d process(es)); running eagerly",
                plan.name,
                runtime.device,
                runtime.world_size,
            )
        discs = (
            [nets.discoverer if adv.discoverer else None, nets.corrector if adv.corrector else None]
            if plan.adversarial
            else []
        )
        seg_opt, disc_opt = build_optimizers(
            nets.segmentor,
            discs,
            family=levers.optimizers,
            lr=plan.lr * plan.lr_mult,
            momentum=tr.momentum,
            weight_decay=tr.weight_decay,
            head_lr_mult=plan.head_lr_mult,
            duplicate_params=plan.duplicate_params,
            lr_d=adv.lr * plan.lr_mult,
            betas=adv.betas,
            tensor_lr=levers.cuda_graphs,
        )
        mults = (1.0,) if len(seg_opt.param_groups) == 1 else (1.0, plan.head_lr_mult)
        schedule = Schedule(plan.lr * plan.lr_mult, adv.lr * plan.lr_mult, plan.poly_steps, tr.power, mults)
        models = wrap(nets) if wrap else StepModels(nets.segmentor, nets.discoverer, nets.corrector)
        settings = step_settings(cfg, plan)
        warmup = adversarial_warmup(cfg, plan)
        engine = cls(plan, runtime, models, seg_opt, disc_opt, settings, schedule, step_fn=train_step, warmup=warmup)
        if levers.cuda_graphs:
            if warmup is not None:
                engine._adv_scale = torch.zeros((), dtype=torch.float32, device=runtime.device)
            engine.graphed = GraphedStep(
                models, seg_opt, disc_opt, settings, levers.amp_dtype, warmup=graph_warmup, adv_scale=engine._adv_scale
            )
        elif levers.amp_dtype == torch.float16:
            engine.scaler = _grad_scaler(runtime.device)
        return engine

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer | None]:
        """The optimisers by the names a checkpoint stores them under."""
        return {"segmentor": self.seg_opt, "discriminators": self.disc_opt}

    def set_lr(self, step: int) -> tuple[float, float]:
        """Set the poly learning rates of iteration ``step``; returns (segmentor, discriminators)."""
        lr, lr_d = self.schedule.at(step, self.lr_scale)
        set_lrs(self.seg_opt, lr, self.schedule.group_mults)
        if self.disc_opt is not None:
            set_lrs(self.disc_opt, lr_d, [1.0])
        return lr, lr_d

    def train_modes(self, modules: list[torch.nn.Module]) -> None:
        """Train mode for the stage, or eval mode throughout with frozen BatchNorm."""
        for m in modules:
            m.train(self.plan.batchnorm != "frozen")

    def prepare(
        self, source: dict[str, Any], target: dict[str, Any] | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """A batch on the device: (x_s, y_s, x_t, y_t); the target labels only with pseudo labels."""
        dev = self.runtime.device
        xs = source["image"].to(dev, non_blocking=True)
        ys = source["label"].to(dev, non_blocking=True)
        xt = target["image"].to(dev, non_blocking=True) if target is not None else xs
        yt = (
            target["label"].to(dev, non_blocking=True)
            if (target is not None and self.plan.pseudo_dir is not None)
            else None
        )
        if self.runtime.channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
            xt = xt.contiguous(memory_format=torch.channels_last)
        return xs, ys, xt, yt

    def step(self, step: int, xs: Tensor, ys: Tensor, xt: Tensor, yt: Tensor | None) -> StepResult:
        """Iteration ``step``: its learning rates, its warm-up factor, one update."""
        lr, lr_d = self.set_lr(step)
        scale = self.warmup.scale(step) if self.warmup is not None else None
        overflow = False
        if self.graphed is not None:
            if self._adv_scale is not None:
                assert scale is not None  # the tensor exists only with a warm-up
                self._adv_scale.fill_(float(scale))
            out, applied = self.graphed(xs, ys, xt, yt)
        elif self.scaler is not None:
            out, applied, overflow = _scaled_step(self, xs, ys, xt, yt, scale)
        else:
            out, applied = self.step_fn(
                self.models,
                self.seg_opt,
                self.disc_opt,
                xs,
                ys,
                xt,
                yt,
                self.settings,
                self.runtime.autocast,
                adv_scale=scale,
            )
        if scale is not None:
            out["adversarial/warmup"] = torch.tensor(scale)
        return StepResult(out, applied, lr, lr_d, overflow)

    def reset(self) -> None:
        """Forget captured graphs (after weights or optimiser state were loaded)."""
        if self.graphed is not None:
            self.graphed.reset()

    def describe(self) -> dict[str, Any]:
        """Which optimisers and step function the engine runs (``dast bench`` rows, tests)."""
        return {
            "segmentor_optimizer": type(self.seg_opt).__name__,
            "discriminator_optimizer": type(self.disc_opt).__name__ if self.disc_opt is not None else None,
            "step_function": "GraphedStep"
            if self.graphed is not None
            else ("train_step+GradScaler" if self.scaler is not None else "train_step"),
        }


def _grad_scaler(device: torch.device) -> Any:
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()  # torch < 2.3


def _scaled_step(
    engine: Engine, xs: Tensor, ys: Tensor, xt: Tensor, yt: Tensor | None, scale: float | None
) -> tuple[dict[str, Tensor], bool, bool]:
    """An fp16 iteration: every loss is scaled before its backward, both optimisers'
    gradients are unscaled, and one check guards both updates (a non-finite loss or
    gradient skips the iteration and lowers the scale, as ``GradScaler.update`` does).
    Returns (scalars, applied, overflow: skipped with finite losses)."""
    scaler = engine.scaler
    out, disc_active = compute_gradients(
        engine.models,
        engine.seg_opt,
        engine.disc_opt,
        xs,
        ys,
        xt,
        yt,
        engine.settings,
        engine.runtime.autocast,
        adv_scale=scale,
        loss_scale=scaler.scale,
    )
    opts = [engine.seg_opt] + ([engine.disc_opt] if engine.disc_opt is not None and disc_active else [])
    for opt in opts:
        scaler.unscale_(opt)
    grads = [p.grad for opt in opts for g in opt.param_groups for p in g["params"] if p.grad is not None]
    loss_flag = losses_finite(out)
    grads_ok = torch.stack([g.isfinite().all() for g in grads]).all() if grads else torch.ones_like(loss_flag)
    losses_ok = all_ranks_agree(loss_flag)  # every rank decides alike under DDP
    if not (losses_ok and all_ranks_agree(grads_ok)):
        for maybe_opt in (engine.seg_opt, engine.disc_opt):
            if maybe_opt is not None:
                maybe_opt.zero_grad(set_to_none=True)
        scaler.update()  # unscale_ recorded the overflow: the scale goes down
        return out, False, losses_ok  # finite losses: an overflow, the scaler's own skip
    for opt in opts:
        scaler.step(opt)
    scaler.update()
    return out, True, False
