"""The engine of one stage: its step context, its update policy and its schedule.

``Engine.build(plan, cfg, nets, runtime)`` is the one place that turns a config into
something that trains: ``dast train`` (through :mod:`dast.training.loop`) and ``dast bench``
(through :mod:`dast.benchmarking.modes`) both call it, so they run the same optimisers and
the same step for the same config. It owns

* the :class:`~dast.training.step.StepContext`: networks (DDP-wrapped or not), the
  optimisers (released, ``foreach`` or graph-capturable, :mod:`dast.training.optim`, as the
  runtime's levers say, :mod:`dast.training.levers`), the step settings and autocast;
* the update policy (:mod:`dast.training.updates`): plain, fp16-scaled or CUDA-graphed;
* the poly learning-rate schedule (``set_lr``), the optional adversarial warm-up and the
  learning-rate scale that a rollback lowers;
* its checkpointable state (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dast.config import Config
from dast.errors import NumericalFault
from dast.models.io import Networks
from dast.training.graphs import GraphedUpdate
from dast.training.optim import OptimizerSettings, build_optimizers, poly_lr, set_lrs
from dast.training.plans import AdversarialWarmup, StagePlan, adversarial_warmup, step_settings
from dast.training.runtime import Runtime
from dast.training.step import Batch, ExtraLosses, StepContext, StepModels
from dast.training.updates import PlainUpdate, ScaledUpdate, UpdatePolicy, needs_loss_scaling


@dataclass(frozen=True)
class LrSchedule:
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
    """What iteration ``step`` returned, with the learning rates it ran at. ``overflow``:
    skipped by the fp16 loss scaling, not a fault (``note`` says so)."""

    step: int
    scalars: dict[str, Tensor]
    applied: bool
    lr: float
    lr_d: float
    overflow: bool = False
    note: str | None = None


def choose_update(
    ctx: StepContext, runtime: Runtime, warmup: AdversarialWarmup | None, graph_warmup: int
) -> UpdatePolicy:
    """The update policy the runtime's levers call for: graphs, fp16 scaling, or plain. A
    step with extra losses (the online stage draws its mixes on the host) is never graphed."""
    if runtime.levers.cuda_graphs and ctx.extra is None:
        return GraphedUpdate(ctx, warmup=graph_warmup, with_adv_scale=warmup is not None)
    if needs_loss_scaling(runtime.levers.amp_dtype):
        return ScaledUpdate(runtime.device)
    return PlainUpdate()


class Engine:
    """Step context, update policy and schedule of one stage; see the module docstring."""

    def __init__(
        self,
        plan: StagePlan,
        runtime: Runtime,
        ctx: StepContext,
        schedule: LrSchedule,
        *,
        warmup: AdversarialWarmup | None = None,
        graph_warmup: int = 3,
    ) -> None:
        self.plan, self.runtime, self.ctx, self.schedule, self.warmup = plan, runtime, ctx, schedule, warmup
        self.update = choose_update(ctx, runtime, warmup, graph_warmup)
        self.lr_scale = 1.0

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
        extra: ExtraLosses | None = None,
    ) -> Engine:
        """The engine of ``plan`` for ``nets`` on ``runtime`` (``wrap``: the DDP wrapping;
        ``extra``: segmentor losses beyond DAST's, e.g. the online stage's)."""
        tr, adv, levers = cfg.train, cfg.adversarial, runtime.levers
        if log is not None and cfg.runtime.cuda_graphs and not levers.cuda_graphs:
            log.warning("%s: CUDA graphs are off (%s); running eagerly", plan.name, levers.why.get("cuda_graphs"))
        elif log is not None and levers.cuda_graphs and extra is not None:
            log.warning("%s: CUDA graphs are off for the online stage (it draws its mixes on the host)", plan.name)
        discs = (
            [nets.discoverer if adv.discoverer else None, nets.corrector if adv.corrector else None]
            if plan.adversarial
            else []
        )
        settings = OptimizerSettings(
            lr=plan.lr * plan.lr_mult,
            momentum=tr.momentum,
            weight_decay=tr.weight_decay,
            head_lr_mult=plan.head_lr_mult,
            duplicate_params=plan.duplicate_params,
            lr_d=adv.lr * plan.lr_mult,
            betas=adv.betas,
        )
        seg_opt, disc_opt = build_optimizers(
            nets.segmentor, discs, settings, family=levers.optimizers, tensor_lr=levers.cuda_graphs
        )
        mults = (1.0,) if len(seg_opt.param_groups) == 1 else (1.0, plan.head_lr_mult)
        schedule = LrSchedule(settings.lr, settings.lr_d, plan.poly_steps, tr.power, mults)
        models = wrap(nets) if wrap else StepModels(nets.segmentor, nets.discoverer, nets.corrector)
        ctx = StepContext(models, seg_opt, disc_opt, step_settings(cfg, plan), runtime.autocast, extra)
        return cls(plan, runtime, ctx, schedule, warmup=adversarial_warmup(cfg, plan), graph_warmup=graph_warmup)

    @property
    def seg_opt(self) -> torch.optim.Optimizer:
        return self.ctx.seg_opt

    @property
    def disc_opt(self) -> torch.optim.Optimizer | None:
        return self.ctx.disc_opt

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer | None]:
        """The optimisers by the names a checkpoint stores them under."""
        return {"segmentor": self.ctx.seg_opt, "discriminators": self.ctx.disc_opt}

    def set_lr(self, step: int) -> tuple[float, float]:
        """Set the poly learning rates of iteration ``step``; returns (segmentor, discriminators)."""
        lr, lr_d = self.schedule.at(step, self.lr_scale)
        set_lrs(self.ctx.seg_opt, lr, self.schedule.group_mults)
        if self.ctx.disc_opt is not None:
            set_lrs(self.ctx.disc_opt, lr_d, [1.0])
        return lr, lr_d

    def train_modes(self, modules: list[torch.nn.Module]) -> None:
        """Train mode for the stage, or eval mode throughout with frozen BatchNorm."""
        for m in modules:
            m.train(self.plan.batchnorm != "frozen")

    def prepare(self, source: dict[str, Any], target: dict[str, Any] | None) -> Batch:
        """A batch on the device; the target labels only in a stage trained on pseudo labels."""
        dev = self.runtime.device
        xs = source["image"].to(dev, non_blocking=True)
        ys = source["label"].to(dev, non_blocking=True)
        xt = target["image"].to(dev, non_blocking=True) if target is not None else xs
        yt = target["label"].to(dev, non_blocking=True) if (target is not None and self.plan.pseudo_labels) else None
        if self.runtime.channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
            xt = xt.contiguous(memory_format=torch.channels_last)
        return Batch(xs, ys, xt, yt)

    def step(self, step: int, batch: Batch) -> StepResult:
        """Iteration ``step``: its learning rates, its warm-up factor, one update."""
        lr, lr_d = self.set_lr(step)
        scale = self.warmup.scale(step) if self.warmup is not None else None
        try:
            update = self.update(self.ctx, batch, scale)
        except NumericalFault as exc:
            raise NumericalFault(f"{self.plan.name} step {step}: {exc}") from None
        if scale is not None:
            update.scalars["adversarial/warmup"] = torch.tensor(scale)
        return StepResult(step, update.scalars, update.applied, lr, lr_d, update.overflow, update.note)

    def reset(self) -> None:
        """Forget captured graphs (after weights or optimiser state were loaded)."""
        self.update.reset()

    def state_dict(self) -> dict[str, Any]:
        """The optimisers' state dicts, the learning-rate scale and the update policy's state."""
        return {
            "optimizers": {k: (o.state_dict() if o is not None else None) for k, o in self.optimizers.items()},
            "lr_scale": self.lr_scale,
            "update": self.update.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (an optimiser missing from it keeps its state)."""
        for name, opt in self.optimizers.items():
            sd = state.get("optimizers", {}).get(name)
            if opt is not None and sd is not None:
                opt.load_state_dict(sd)
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.update.load_state_dict(state.get("update", {}))
        self.reset()  # captured graphs hold the replaced tensors

    def describe(self) -> dict[str, Any]:
        """Which optimisers and step function the engine runs (``dast bench`` rows, tests)."""
        return {
            "segmentor_optimizer": type(self.ctx.seg_opt).__name__,
            "discriminator_optimizer": type(self.ctx.disc_opt).__name__ if self.ctx.disc_opt is not None else None,
            "step_function": self.update.name,
        }
