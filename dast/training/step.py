"""One training iteration of DAST (stage 1, and stage 2 with pseudo labels), in three phases.

1. **source**: f_s = E(x_s), L_seg on the upsampled prediction, backward;
2. **target**: the target batch through the target path, f_t = E(x_t), D(f_t), attention,
   logits; lambda_d * L_adv^D + lambda_c * L_adv^C (+ mu * L_p_seg in stage 2), backward
   into the segmentor only (the discriminators are frozen for this part);
3. **discriminators**: the four terms of :data:`DISCRIMINATOR_TERMS` on the detached
   source and target features and outputs, backward into D and C only;

then both optimiser steps (:func:`apply_updates`), when the update policy
(:mod:`dast.training.updates`) decides to apply them.

Every step function takes ``(ctx, batch, adv_scale)``: the :class:`StepContext` (networks,
optimisers, settings, autocast) that the engine owns, one :class:`Batch`, and the
adversarial warm-up factor (None: no warm-up).

The released code updates the segmentor before computing the discriminator losses.
Those losses only use detached features computed before that update and the
discriminators' weights, which the segmentor step does not touch, so stepping both
optimisers at the end is the same computation; it lets one finiteness check guard both
updates.

``reuse_discoverer`` evaluates D(f_t) once per iteration instead of three times (for
the attention, for the adversarial loss and for D's own update); the values are the
same and the gradients are routed with ``torch.autograd.backward(inputs=...)``.

Nothing here reads a value back to the host, so phases 1-3 can be captured in a CUDA
graph (:mod:`dast.training.graphs`); the decision to apply the updates is the policy's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from dast import losses
from dast.models.attention import attend
from dast.models.discriminators import Corrector, Discoverer
from dast.models.segmentor import Segmentor

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0
Autocast = Callable[[], contextlib.AbstractContextManager[object]]


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    """What one iteration computes; built from the config by
    :func:`dast.training.plans.step_settings` (the defaults live in the config only).

    ``weight_segmentor_adv`` weights the segmentor's L_adv^C(E, P) on target outputs by the
    attention map (the paper's text); ``weight_corrector_adv`` weights the target term of
    the corrector's own loss. ``forward_target`` runs the target batch through the segmentor
    without any loss, so that BatchNorm sees target images (the ``source_only_bn`` control).
    ``mu`` weighs L_p_seg when the batch carries target (pseudo) labels; ``adversarial``
    false: no discriminator losses at all (the segmentor still trains).
    """

    adv_loss: losses.AdvLossName
    lambda_d: float
    lambda_c: float
    attention: bool
    weight_segmentor_adv: bool
    weight_corrector_adv: bool
    reuse_discoverer: bool
    mu: float
    adversarial: bool
    forward_target: bool


@dataclass
class StepModels:
    """The networks of one iteration, plus the hooks a data-parallel run plugs in.

    ``extract``/``predict`` default to the segmentor's own halves; under DDP they are the
    wrapped E and P. ``seg_no_sync`` suspends gradient all-reduce for the first of the
    segmentor's two backward passes. ``adversaries`` is a DDP-wrapped module mapping
    detached (f_s, p_s, f_t, p_t) to (D(f_s), C(p_s), D(f_t), C(p_t)); when given, the
    discriminator step runs through it (one forward, one backward).
    """

    segmentor: Segmentor
    discoverer: Discoverer | None
    corrector: Corrector | None
    extract: Callable[[Tensor], Tensor] | None = None
    predict: Callable[[Tensor], Tensor] | None = None
    seg_no_sync: Callable[[], contextlib.AbstractContextManager[object]] | None = None
    adversaries: torch.nn.Module | None = None


@dataclass(frozen=True)
class Batch:
    """One iteration's tensors on the device: source images and labels, target images and,
    in self-training, target (pseudo) labels."""

    xs: Tensor
    ys: Tensor
    xt: Tensor
    yt: Tensor | None = None


class ExtraLosses(Protocol):
    """Segmentor losses beyond DAST's, e.g. online self-training's (:mod:`dast.training.online`).

    ``source_loss`` gets the source features E(x_s) of the source phase and returns a term
    added to L_seg before its backward (or None). ``loss_fns`` returns thunks, each running its
    own forward passes through ``student`` (the target path: E, the attention, P) and returning
    a loss; each is backpropagated into the segmentor before the next is called (so one graph
    lives at a time, and under DDP each backward follows its own forward).
    """

    def source_loss(self, features: Tensor, batch: Batch, out: dict[str, Tensor]) -> Tensor | None: ...

    def loss_fns(
        self, student: Callable[[Tensor], Tensor], batch: Batch, out: dict[str, Tensor]
    ) -> list[Callable[[], Tensor]]: ...


@dataclass
class StepContext:
    """What every step function works with besides the batch: the engine owns one.
    ``extra``: the segmentor's losses beyond DAST's (None: DAST only)."""

    models: StepModels
    seg_opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer | None
    settings: StepSettings
    autocast: Autocast
    extra: ExtraLosses | None = None


class DiscriminatorTerm(NamedTuple):
    """One term of the discriminators' loss: which output, which domain label."""

    key: str  # loss/<key> in the scalars
    label: float
    weighted: bool  # the corrector's target term may carry the attention weight


DISCRIMINATOR_TERMS = (
    DiscriminatorTerm("d_source", SOURCE_LABEL, False),
    DiscriminatorTerm("c_source", SOURCE_LABEL, False),
    DiscriminatorTerm("d_target", TARGET_LABEL, False),
    DiscriminatorTerm("c_target", TARGET_LABEL, True),
)


@dataclass
class _Wiring:
    """Which paths, networks and gradient routes one iteration uses (from the settings and models)."""

    use_d: bool  # the discoverer's adversarial loss
    use_c: bool  # the corrector's adversarial loss
    attention: bool
    reuse: bool
    need_target: bool  # the target batch is forwarded
    target_loss: bool  # ... and has a loss, so a second backward follows the source one
    disc: Discoverer | None
    corr: Corrector | None
    seg_inputs: list[Tensor] | None  # routed backward of the segmentor's losses
    disc_params: list[Tensor]
    pair: torch.nn.Module | None  # the DDP-wrapped discriminator pair
    extract: Callable[[Tensor], Tensor]
    predict: Callable[[Tensor], Tensor]
    loss_scale: Callable[[Tensor], Tensor] | None = None  # fp16: GradScaler.scale before every backward

    def backward(self, loss: Tensor, inputs: list[Tensor] | None, retain: bool = False) -> None:
        """Backpropagate ``loss`` (scaled under fp16) into ``inputs`` (all leaves if None)."""
        if self.loss_scale is not None:
            loss = self.loss_scale(loss)
        if inputs is None:
            loss.backward(retain_graph=retain)
        else:
            torch.autograd.backward(loss, inputs=inputs, retain_graph=retain)

    @property
    def reuse_for_disc(self) -> bool:
        return self.reuse and self.pair is None

    @property
    def discoverer(self) -> Discoverer:
        """D, for the paths that run it (``use_d`` or ``attention``, each of which implies it)."""
        assert self.disc is not None
        return self.disc

    @property
    def corrector(self) -> Corrector:
        """C, for the paths that run it (``use_c``, which implies it)."""
        assert self.corr is not None
        return self.corr


@dataclass
class _Flow:
    """What the phases hand on to each other."""

    f_s: Tensor
    up_s: Tensor
    f_t: Tensor | None = None
    d_t: Tensor | None = None
    alpha: Tensor | None = None
    up_t: Tensor | None = None
    c_t: Tensor | None = None


def _full(x: Tensor) -> Tensor:
    """Upcast half-precision activations to float32 for losses; leave fp32/fp64 alone."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _set_requires_grad(module: torch.nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


def _wiring(
    models: StepModels,
    seg_opt: torch.optim.Optimizer,
    settings: StepSettings,
    has_pseudo: bool,
    loss_scale: Callable[[Tensor], Tensor] | None = None,
) -> _Wiring:
    use_d = settings.adversarial and models.discoverer is not None
    use_c = settings.adversarial and models.corrector is not None
    disc = models.discoverer if (use_d or settings.attention) else None
    corr = models.corrector if use_c else None
    attention = settings.attention and models.discoverer is not None
    reuse = settings.reuse_discoverer
    seg_params = [p for g in seg_opt.param_groups for p in g["params"] if p.requires_grad]
    disc_params: list[Tensor] = [p for m in ((disc if use_d else None), corr) if m is not None for p in m.parameters()]
    return _Wiring(
        use_d=use_d,
        use_c=use_c,
        attention=attention,
        reuse=reuse,
        need_target=use_d or use_c or attention or has_pseudo or settings.forward_target,
        target_loss=use_d or use_c or has_pseudo,  # the attention alone adds no loss
        disc=disc,
        corr=corr,
        seg_inputs=seg_params if reuse and (disc is not None or corr is not None) else None,
        disc_params=disc_params,
        pair=models.adversaries if disc_params else None,
        extract=models.extract or models.segmentor.extract,
        predict=models.predict or models.segmentor.predict,
        loss_scale=loss_scale,
    )


def _adversarial(term: Tensor, weight: float, scale: Tensor | float | None) -> Tensor:
    """``weight * term``, times the warm-up ``scale`` when one is given."""
    weighted = weight * term
    return weighted if scale is None else weighted * scale


def _sync_unless(models: StepModels, later: bool) -> contextlib.AbstractContextManager[object]:
    """DDP's ``no_sync`` when another segmentor backward follows (gradients are all-reduced
    once, at the last one), else nothing."""
    return models.seg_no_sync() if (models.seg_no_sync is not None and later) else contextlib.nullcontext()


def source_phase(
    p: _Wiring,
    models: StepModels,
    batch: Batch,
    autocast: Autocast,
    out: dict[str, Tensor],
    *,
    later: bool,
    extra: ExtraLosses | None = None,
) -> _Flow:
    """L_seg on the source batch (plus ``extra``'s term on the source features) and its
    backward; no gradient all-reduce yet under DDP when a ``later`` backward follows
    (``forward_target`` alone has none)."""
    with _sync_unless(models, later):
        with autocast():
            f_s = p.extract(batch.xs)
            logits_s = p.predict(f_s)
        up_s = losses.upsample(_full(logits_s), losses.spatial_size(batch.ys))
        l_seg = losses.segmentation_loss(up_s, batch.ys)
        more = extra.source_loss(f_s, batch, out) if extra is not None else None
        p.backward(l_seg if more is None else l_seg + more, p.seg_inputs)
    out["loss/seg"] = l_seg.detach()
    return _Flow(f_s=f_s, up_s=up_s)


def _student(p: _Wiring, autocast: Autocast) -> Callable[[Tensor], Tensor]:
    """The segmentor's target path as a function of the images: logits (E, attention, P)."""

    def forward(images: Tensor) -> Tensor:
        with autocast():
            f = p.extract(images)
            if p.attention:
                f, _ = attend(f, p.discoverer(f))
            return p.predict(f)

    return forward


def extra_phase(p: _Wiring, models: StepModels, fns: Sequence[Callable[[], Tensor]], out: dict[str, Tensor]) -> Tensor:
    """The extra losses' own forward passes, each backpropagated into the segmentor (DDP
    all-reduces at the last segmentor backward of the iteration); returns their detached sum."""
    total = out["loss/seg"].new_zeros((), dtype=torch.float32)
    for k, fn in enumerate(fns):
        with _sync_unless(models, later=p.target_loss or k < len(fns) - 1):
            loss = fn()
            p.backward(loss, p.seg_inputs)
        total = total + loss.detach().float()
    return total


def _target_forward(p: _Wiring, images: Tensor, autocast: Autocast, flow: _Flow) -> None:
    with autocast():
        f_t = p.extract(images)
        d_t = alpha = None
        if p.attention:
            d_t = p.discoverer(f_t)
            f_att, alpha = attend(f_t, d_t)
        else:
            f_att = f_t
            if p.use_d:
                d_t = p.discoverer(f_t)
        logits_t = p.predict(f_att)
    flow.f_t, flow.d_t, flow.alpha = f_t, d_t, alpha
    flow.up_t = losses.upsample(_full(logits_t), losses.spatial_size(images))


def target_phase(
    p: _Wiring,
    settings: StepSettings,
    images: Tensor,
    labels: Tensor | None,
    autocast: Autocast,
    flow: _Flow,
    out: dict[str, Tensor],
    adv_scale: Tensor | float | None,
) -> Tensor:
    """The target path and the segmentor's adversarial and pseudo-label losses, backward
    into the segmentor; returns their detached sum."""
    with contextlib.nullcontext() if p.target_loss else torch.no_grad():  # forward_target: BatchNorm only
        _target_forward(p, images, autocast, flow)
    up_t = flow.up_t
    assert up_t is not None
    g_loss = up_t.new_zeros(())
    if p.use_d:
        if not p.reuse and p.attention:  # released: a second evaluation of D for the loss
            with autocast():
                d_t_loss = p.discoverer(flow.f_t)
        else:
            d_t_loss = flow.d_t
        l_adv_d = losses.adversarial_loss(settings.adv_loss, _full(d_t_loss), SOURCE_LABEL)
        g_loss = g_loss + _adversarial(l_adv_d, settings.lambda_d, adv_scale)
        out["loss/adv_d"] = l_adv_d.detach()
        out["out/d_target"] = d_t_loss.detach().float().mean()
    if p.use_c:
        with autocast():
            flow.c_t = p.corrector(F.softmax(up_t, dim=1))
        c_t = _full(flow.c_t)
        if settings.weight_segmentor_adv and flow.alpha is not None:
            l_adv_c = losses.attention_weighted_corrector_loss(
                settings.adv_loss,
                c_t,
                SOURCE_LABEL,
                _full(flow.alpha),
            )
        else:
            l_adv_c = losses.adversarial_loss(settings.adv_loss, c_t, SOURCE_LABEL)
        g_loss = g_loss + _adversarial(l_adv_c, settings.lambda_c, adv_scale)
        out["loss/adv_c"] = l_adv_c.detach()
        out["out/c_target"] = flow.c_t.detach().float().mean()
    if labels is not None:
        l_pseg = losses.cross_entropy(up_t, labels)
        g_loss = settings.mu * l_pseg + g_loss
        out["loss/pseudo_seg"] = l_pseg.detach()
    if g_loss.requires_grad:
        p.backward(g_loss, p.seg_inputs, retain=p.reuse_for_disc and bool(p.disc_params))
    return g_loss.detach()


def _present(x: Tensor | None) -> Tensor:
    assert x is not None  # the target forward ran: use_d and use_c imply need_target
    return x


def _reused_or_run(reuse: bool, cached: Tensor | None, run: Callable[[], Tensor], autocast: Autocast) -> Tensor:
    """The output the segmentor's graph already holds when it is reused, else ``run()``."""
    if reuse and cached is not None:
        return cached
    with autocast():
        return run()


def _discriminator_outputs(p: _Wiring, flow: _Flow, autocast: Autocast) -> dict[str, Tensor | None]:
    """D(f_s), C(p_s), D(f_t), C(p_t) on detached inputs (the target ones taken from the
    segmentor's graph when D(f_t) is reused)."""
    with autocast():
        d_s = p.discoverer(flow.f_s.detach()) if p.use_d else None
        c_s = p.corrector(F.softmax(flow.up_s.detach(), dim=1)) if p.use_c else None
    reuse = p.reuse_for_disc
    d_t = (
        _reused_or_run(reuse, flow.d_t, lambda: p.discoverer(_present(flow.f_t).detach()), autocast)
        if p.use_d
        else None
    )
    c_t = (
        _reused_or_run(reuse, flow.c_t, lambda: p.corrector(F.softmax(_present(flow.up_t).detach(), dim=1)), autocast)
        if p.use_c
        else None
    )
    return {"d_source": d_s, "c_source": c_s, "d_target": d_t, "c_target": c_t}


def _pair_outputs(p: _Wiring, flow: _Flow, autocast: Autocast) -> dict[str, Tensor | None]:
    """The same four outputs through the DDP-wrapped pair (one forward)."""
    assert p.pair is not None
    with autocast():
        d_s, c_s, d_t, c_t = p.pair(
            flow.f_s.detach() if p.use_d else None,
            F.softmax(flow.up_s.detach(), dim=1) if p.use_c else None,
            flow.f_t.detach() if (p.use_d and flow.f_t is not None) else None,
            F.softmax(flow.up_t.detach(), dim=1) if (p.use_c and flow.up_t is not None) else None,
        )
    return {"d_source": d_s, "c_source": c_s, "d_target": d_t, "c_target": c_t}


def _term_losses(
    settings: StepSettings, outputs: dict[str, Tensor | None], alpha: Tensor | None, out: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Each present term of :data:`DISCRIMINATOR_TERMS` as a loss (and its logged scalars)."""
    terms: dict[str, Tensor] = {}
    for term in DISCRIMINATOR_TERMS:
        o = outputs[term.key]
        if o is None:
            continue
        if term.weighted and settings.weight_corrector_adv and alpha is not None:
            loss = losses.attention_weighted_corrector_loss(settings.adv_loss, _full(o), term.label, _full(alpha))
        else:
            loss = losses.adversarial_loss(settings.adv_loss, _full(o), term.label)
        out[f"loss/{term.key}"] = loss.detach()
        if term.label == SOURCE_LABEL:
            out[f"out/{term.key}"] = o.detach().float().mean()
        terms[term.key] = loss
    return terms


def _sum(terms: dict[str, Tensor], keys: tuple[str, ...], like: Tensor) -> Tensor:
    total = like.new_zeros((), dtype=torch.float32)
    for k in keys:
        if k in terms:
            total = total + terms[k]
    return total


def discriminator_phase(
    p: _Wiring, settings: StepSettings, flow: _Flow, autocast: Autocast, out: dict[str, Tensor]
) -> None:
    """The discriminators' losses and their backward into D and C only."""
    if p.pair is not None:
        terms = _term_losses(settings, _pair_outputs(p, flow, autocast), flow.alpha, out)
        total = _sum(terms, ("d_source", "c_source", "d_target", "c_target"), flow.f_s)
        p.backward(total, None)
        out["loss/disc"] = total.detach()
        return
    terms = _term_losses(settings, _discriminator_outputs(p, flow, autocast), flow.alpha, out)
    l_src = _sum(terms, ("d_source", "c_source"), flow.f_s)
    if l_src.requires_grad:
        p.backward(l_src, p.disc_params if p.reuse else None)
    l_tgt = _sum(terms, ("d_target", "c_target"), flow.f_s)
    if p.reuse_for_disc:
        # D(f_t) and C(p_t) come from the segmentor's graph, where p_t depends on D
        # through the attention: route each loss to its own discriminator only.
        if p.use_d:
            p.backward(terms["d_target"], list(p.discoverer.parameters()), retain=p.use_c)
        if p.use_c:
            p.backward(terms["c_target"], list(p.corrector.parameters()))
    elif l_tgt.requires_grad:
        p.backward(l_tgt, None)
    out["loss/disc"] = (l_src + l_tgt).detach()


def compute_gradients(
    ctx: StepContext,
    batch: Batch,
    adv_scale: Tensor | float | None = None,
    *,
    loss_scale: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[str, Tensor], bool]:
    """Phases 1-3 of an iteration: clear the gradients, compute every loss and backward.

    ``adv_scale`` multiplies the segmentor's adversarial terms (the warm-up ramp); None
    leaves them as they are. ``loss_scale`` (fp16: the update policy's scaling) is applied
    to every loss right before its backward; the logged losses stay unscaled. Returns
    (detached scalars for logging, whether ``disc_opt`` has gradients to apply).
    """
    models, settings = ctx.models, ctx.settings
    p = _wiring(models, ctx.seg_opt, settings, batch.yt is not None, loss_scale)
    zero_grads(ctx)
    if not p.reuse:  # the released way: freeze D and C while the segmentor's losses backpropagate
        _set_requires_grad(p.disc, False)
        _set_requires_grad(p.corr, False)
    out: dict[str, Tensor] = {}
    fns = ctx.extra.loss_fns(_student(p, ctx.autocast), batch, out) if ctx.extra is not None else []
    flow = source_phase(p, models, batch, ctx.autocast, out, later=p.target_loss or bool(fns), extra=ctx.extra)
    total = out["loss/seg"]
    if fns:
        total = total + extra_phase(p, models, fns, out)
    if p.need_target:
        total = total + target_phase(p, settings, batch.xt, batch.yt, ctx.autocast, flow, out, adv_scale)
    if not p.reuse:
        _set_requires_grad(p.disc, True)
        _set_requires_grad(p.corr, True)
    if p.disc_params and ctx.disc_opt is not None:
        discriminator_phase(p, settings, flow, ctx.autocast, out)
    out["loss/total"] = total
    if flow.alpha is not None:
        out["attention/mean"] = flow.alpha.detach().float().mean()
    return out, bool(p.disc_params)


def zero_grads(ctx: StepContext) -> None:
    """Drop the gradients of both optimisers' parameters."""
    ctx.seg_opt.zero_grad(set_to_none=True)
    if ctx.disc_opt is not None:
        ctx.disc_opt.zero_grad(set_to_none=True)


def losses_finite(out: dict[str, Tensor]) -> Tensor:
    """A device boolean: whether every ``loss/*`` entry of ``out`` is finite (no host sync)."""
    vals = torch.stack([v.float() for k, v in out.items() if k.startswith("loss/")])
    return torch.isfinite(vals).all()


def apply_updates(ctx: StepContext, disc_active: bool) -> None:
    """Step the segmentor optimiser, and the discriminators' when they have gradients."""
    ctx.seg_opt.step()
    if ctx.disc_opt is not None and disc_active:
        ctx.disc_opt.step()
