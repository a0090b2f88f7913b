"""From a resolved config to what each stage trains: the one translation of the config.

* :func:`stage_plans` — the stages of a run (stage 1, then the self-training rounds or the
  online stage), used
  by the pipeline, ``dast bench`` and the benchmark scripts alike;
* :func:`step_settings` — what one iteration of a stage computes;
* :func:`adversarial_warmup` — the optional warm-up of stage 1's adversarial terms.

Every default lives in :mod:`dast.config`; the dataclasses here have none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dast.config import Config
from dast.rundir import ONLINE, STAGE1, round_name
from dast.training.step import StepSettings

BatchNormMode = Literal["train", "frozen"]
StageKind = Literal["adversarial", "round", "online"]


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """What one stage trains.

    ``kind``: stage 1 (``adversarial``, also for source-only and oracle runs), an offline
    self-training ``round``, or the ``online`` stage with a mean teacher.
    ``index`` is 0 for stage 1 and k for round k (1 for the online stage); ``pseudo_labels``: the target batches
    carry the round's pseudo labels; ``global_offset``: the iterations of the earlier
    stages (for plots); ``lr_mult``: the data-parallel learning-rate scaling;
    ``batchnorm``: ``frozen`` trains with the networks in eval mode (the released
    self-training); ``eval_every``: the evaluation cadence.
    """

    name: str
    kind: StageKind
    index: int
    steps: int
    poly_steps: int
    lr: float
    head_lr_mult: float
    duplicate_params: bool
    adversarial: bool
    mu: float
    pseudo_labels: bool
    global_offset: int
    lr_mult: float
    batchnorm: BatchNormMode
    eval_every: int


def stage_plans(cfg: Config, world: int) -> list[StagePlan]:
    """The stages of a run of the resolved config ``cfg`` on ``world`` processes: stage 1,
    then the self-training rounds or the online stage."""
    st = cfg.self_training
    if st.mode == "online":
        return [_plan(cfg, world, "adversarial", 0), _plan(cfg, world, "online", 1)]
    return [_plan(cfg, world, "adversarial", 0)] + [_plan(cfg, world, "round", k) for k in range(1, st.rounds + 1)]


def _plan(cfg: Config, world: int, kind: StageKind, k: int) -> StagePlan:
    """Stage ``k`` of ``kind``. Stage 1 uses ``train``'s schedule and the released duplicated
    parameter list when asked; the rounds and the online stage use ``self_training``'s, with
    each parameter listed once (the released stage 2: ``model.parameters()``). The rounds
    train on their pseudo labels with ``self_training.batchnorm``; the online stage keeps or
    drops stage 1's adversarial terms and trains with batch statistics."""
    tr, st = cfg.train, cfg.self_training
    # a run's config is resolved (dast.config.resolve): no variant-dependent null is left
    assert tr.head_lr_mult is not None and tr.duplicate_params is not None
    assert st.head_lr_mult is not None and st.lr is not None and st.poly_steps is not None
    assert st.batchnorm is not None
    first = kind == "adversarial"
    has_disc = cfg.adversarial.discoverer or cfg.adversarial.corrector
    keeps = {"adversarial": True, "round": st.adversarial, "online": st.online.adversarial == "keep"}[kind]
    return StagePlan(
        name=STAGE1 if first else (ONLINE if kind == "online" else round_name(k)),
        kind=kind,
        index=k,
        steps=tr.steps if first else st.steps,
        poly_steps=tr.poly_steps if first else st.poly_steps,
        lr=tr.lr if first else st.lr,
        head_lr_mult=tr.head_lr_mult if first else st.head_lr_mult,
        duplicate_params=tr.duplicate_params if first else False,
        adversarial=has_disc and keeps,
        mu=st.mu,
        pseudo_labels=kind == "round",
        global_offset=0 if first else tr.steps + (k - 1) * st.steps,
        lr_mult=float(world) if cfg.distributed.lr_scaling == "linear" else 1.0,
        batchnorm=st.batchnorm if kind == "round" else "train",
        eval_every=tr.eval_every if first else (st.eval_every or tr.eval_every),
    )


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


def adversarial_warmup(cfg: Config, plan: StagePlan) -> AdversarialWarmup | None:
    """The warm-up of stage 1 when the config asks for one (rounds never warm up)."""
    adv = cfg.adversarial
    if plan.index != 0 or not plan.adversarial or (adv.warmup_steps == 0 and adv.warmup_ramp == 0):
        return None
    return AdversarialWarmup(adv.warmup_steps, adv.warmup_ramp)
