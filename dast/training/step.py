"""One training iteration of DAST (stage 1, and stage 2 with pseudo labels).

Order of work, as in the released code:

1. source batch: f_s = E(x_s), L_seg on the upsampled prediction, backward;
2. target batch through the target path: f_t = E(x_t), D(f_t), attention, logits;
   lambda_d * L_adv^D + lambda_c * L_adv^C (+ mu * L_p_seg in stage 2), backward into the
   segmentor only (the discriminators are frozen for this part);
3. discriminator losses on the source and target features and outputs, backward into
   D and C only;
4. both optimiser steps.

The released code updates the segmentor before computing the discriminator losses.
Those losses only use detached features computed before that update and the
discriminators' weights, which the segmentor step does not touch, so stepping both
optimisers at the end is the same computation; it lets one finiteness check guard both
updates.

``reuse_discoverer`` evaluates D(f_t) once per iteration instead of three times (for
the attention, for the adversarial loss and for D's own update); the values are the
same and the gradients are routed with ``torch.autograd.backward(inputs=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from dast import losses
from dast.models.attention import attend
from dast.models.discriminators import Corrector, Discoverer
from dast.models.segmentor import Segmentor

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


@dataclass(frozen=True)
class StepSettings:
    """What one iteration computes."""

    adv_loss: str = "lsgan"
    lambda_d: float = 0.01
    lambda_c: float = 0.01
    attention: bool = True
    weight_corrector: bool = False  # the paper's attention-weighted L_adv^C
    reuse_discoverer: bool = True
    mu: float = 1.0  # weight of L_p_seg when pseudo labels are given
    adversarial: bool = True  # false: no discriminator losses at all (still trains S)


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
    seg_no_sync: Callable[[], ContextManager[object]] | None = None
    adversaries: torch.nn.Module | None = None


def _full(x: Tensor) -> Tensor:
    """Upcast half-precision activations to float32 for losses; leave fp32/fp64 alone."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _set_requires_grad(module: torch.nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


def _backward(loss: Tensor, inputs: list[Tensor] | None, retain: bool = False) -> None:
    if inputs is None:
        loss.backward(retain_graph=retain)
    else:
        torch.autograd.backward(loss, inputs=inputs, retain_graph=retain)


def _pair_discriminator_step(
    pair: torch.nn.Module, f_s: Tensor, up_s: Tensor, f_t: Tensor | None, up_t: Tensor | None, alpha: Tensor | None,
    use_d: bool, use_c: bool, settings: StepSettings, autocast: Callable[[], ContextManager[object]],
    out: dict[str, Tensor],
) -> None:
    """The discriminator update through one (DDP-wrapped) forward and one backward."""
    with autocast():
        d_s, c_s, d_t, c_t = pair(
            f_s.detach() if use_d else None,
            F.softmax(up_s.detach(), dim=1) if use_c else None,
            f_t.detach() if (use_d and f_t is not None) else None,
            F.softmax(up_t.detach(), dim=1) if (use_c and up_t is not None) else None,
        )
    total = f_s.new_zeros((), dtype=torch.float32)
    for key, o, label in (("d_source", d_s, SOURCE_LABEL), ("c_source", c_s, SOURCE_LABEL),
                          ("d_target", d_t, TARGET_LABEL), ("c_target", c_t, TARGET_LABEL)):
        if o is None:
            continue
        weight = None
        if key == "c_target" and settings.weight_corrector and alpha is not None:
            weight = losses.resize_weight(_full(alpha), tuple(o.shape[-2:]))
        loss = losses.adversarial_loss(settings.adv_loss, _full(o), label, weight)
        out[f"loss/{key}"] = loss.detach()
        if key.endswith("source"):
            out[f"out/{key}"] = o.detach().float().mean()
        total = total + loss
    total.backward()
    out["loss/disc"] = total.detach()


def compute_gradients(
    models: StepModels,
    seg_opt: torch.optim.Optimizer,
    disc_opt: torch.optim.Optimizer | None,
    source_images: Tensor,
    source_labels: Tensor,
    target_images: Tensor,
    target_labels: Tensor | None,
    settings: StepSettings,
    autocast: Callable[[], ContextManager[object]],
) -> tuple[dict[str, Tensor], bool]:
    """Phases 1-3 of an iteration: clear the gradients, compute every loss and backward.

    Returns (detached scalars for logging, whether ``disc_opt`` has gradients to apply).
    Nothing here reads a value back to the host, so the whole phase can be captured in a
    CUDA graph (see :mod:`dast.training.fast`).
    """
    seg = models.segmentor
    use_d = settings.adversarial and models.discoverer is not None
    use_c = settings.adversarial and models.corrector is not None
    disc = models.discoverer if (use_d or settings.attention) else None
    corr = models.corrector if use_c else None
    attention = settings.attention and models.discoverer is not None
    reuse = settings.reuse_discoverer
    need_target = use_d or use_c or attention or target_labels is not None

    seg_opt.zero_grad(set_to_none=True)
    if disc_opt is not None:
        disc_opt.zero_grad(set_to_none=True)
    seg_params = [p for g in seg_opt.param_groups for p in g["params"] if p.requires_grad]
    disc_params = [p for m in ((disc if use_d else None), corr) if m is not None for p in m.parameters()]
    if not reuse:  # the released way: freeze D and C while the segmentor's losses backpropagate
        _set_requires_grad(disc, False)
        _set_requires_grad(corr, False)
    g_inputs = seg_params if reuse and (disc is not None or corr is not None) else None
    out: dict[str, Tensor] = {}

    extract = models.extract or seg.extract
    predict = models.predict or seg.predict
    pair = models.adversaries if disc_params else None
    reuse_for_disc = reuse and pair is None

    # ---- 1. source: L_seg (no gradient all-reduce yet when a second backward follows)
    no_sync = models.seg_no_sync if (models.seg_no_sync is not None and need_target) else contextlib.nullcontext
    with no_sync():
        with autocast():
            f_s = extract(source_images)
            logits_s = predict(f_s)
        up_s = losses.upsample(_full(logits_s), tuple(source_labels.shape[-2:]))
        l_seg = losses.cross_entropy(up_s, source_labels)
        _backward(l_seg, g_inputs)
    out["loss/seg"] = l_seg.detach()
    total = l_seg.detach()

    # ---- 2. target path and the segmentor's adversarial / pseudo-label losses
    d_t = c_t = alpha = up_t = f_t = None
    if need_target:
        with autocast():
            f_t = extract(target_images)
            if attention:
                d_t = disc(f_t)  # type: ignore[misc]
                f_att, alpha = attend(f_t, d_t)
            else:
                f_att = f_t
                if use_d:
                    d_t = disc(f_t)  # type: ignore[misc]
            logits_t = predict(f_att)
        up_t = losses.upsample(_full(logits_t), tuple(target_images.shape[-2:]))
        g_loss = up_t.new_zeros(())
        if use_d:
            if not reuse and attention:  # released: a second evaluation of D for the loss
                with autocast():
                    d_t_loss = disc(f_t)  # type: ignore[misc]
            else:
                d_t_loss = d_t
            l_adv_d = losses.adversarial_loss(settings.adv_loss, _full(d_t_loss), SOURCE_LABEL)  # type: ignore[union-attr]
            g_loss = g_loss + settings.lambda_d * l_adv_d
            out["loss/adv_d"] = l_adv_d.detach()
            out["out/d_target"] = d_t_loss.detach().float().mean()  # type: ignore[union-attr]
        if use_c:
            with autocast():
                c_t = corr(F.softmax(up_t, dim=1))  # type: ignore[misc]
            weight = None
            if settings.weight_corrector and alpha is not None:
                weight = losses.resize_weight(_full(alpha), tuple(c_t.shape[-2:]))
            l_adv_c = losses.adversarial_loss(settings.adv_loss, _full(c_t), SOURCE_LABEL, weight)
            g_loss = g_loss + settings.lambda_c * l_adv_c
            out["loss/adv_c"] = l_adv_c.detach()
            out["out/c_target"] = c_t.detach().float().mean()
        if target_labels is not None:
            l_pseg = losses.cross_entropy(up_t, target_labels)
            g_loss = settings.mu * l_pseg + g_loss
            out["loss/pseudo_seg"] = l_pseg.detach()
        if g_loss.requires_grad:
            _backward(g_loss, g_inputs, retain=reuse_for_disc and bool(disc_params))
        total = total + g_loss.detach()
    if not reuse:
        _set_requires_grad(disc, True)
        _set_requires_grad(corr, True)

    # ---- 3. discriminator losses
    if pair is not None and disc_opt is not None:
        _pair_discriminator_step(pair, f_s, up_s, f_t, up_t, alpha, use_d, use_c, settings, autocast, out)
    elif disc_params and disc_opt is not None:
        d_inputs = disc_params if reuse else None
        l_src = f_s.new_zeros((), dtype=torch.float32)
        with autocast():
            d_s = disc(f_s.detach()) if use_d else None  # type: ignore[misc]
            c_s = corr(F.softmax(up_s.detach(), dim=1)) if use_c else None  # type: ignore[misc]
        if d_s is not None:
            l_d_s = losses.adversarial_loss(settings.adv_loss, _full(d_s), SOURCE_LABEL)
            l_src = l_src + l_d_s
            out["loss/d_source"] = l_d_s.detach()
            out["out/d_source"] = d_s.detach().float().mean()
        if c_s is not None:
            l_c_s = losses.adversarial_loss(settings.adv_loss, _full(c_s), SOURCE_LABEL)
            l_src = l_src + l_c_s
            out["loss/c_source"] = l_c_s.detach()
            out["out/c_source"] = c_s.detach().float().mean()
        if l_src.requires_grad:
            _backward(l_src, d_inputs)
        l_tgt = f_s.new_zeros((), dtype=torch.float32)
        if use_d:
            if reuse_for_disc and d_t is not None:
                d_t_disc = d_t
            else:
                with autocast():
                    d_t_disc = disc(f_t.detach())  # type: ignore[misc, union-attr]
            l_d_t = losses.adversarial_loss(settings.adv_loss, _full(d_t_disc), TARGET_LABEL)
            l_tgt = l_tgt + l_d_t
            out["loss/d_target"] = l_d_t.detach()
        if use_c:
            if reuse_for_disc and c_t is not None:
                c_t_disc = c_t
            else:
                with autocast():
                    c_t_disc = corr(F.softmax(up_t.detach(), dim=1))  # type: ignore[misc, union-attr]
            weight = None
            if settings.weight_corrector and alpha is not None:
                weight = losses.resize_weight(_full(alpha), tuple(c_t_disc.shape[-2:]))
            l_c_t = losses.adversarial_loss(settings.adv_loss, _full(c_t_disc), TARGET_LABEL, weight)
            l_tgt = l_tgt + l_c_t
            out["loss/c_target"] = l_c_t.detach()
        if reuse_for_disc:
            # D(f_t) and C(p_t) come from the segmentor's graph, where p_t depends on D
            # through the attention: route each loss to its own discriminator only.
            if use_d:
                _backward(l_d_t, [p for p in disc.parameters()], retain=use_c)  # type: ignore[union-attr]
            if use_c:
                _backward(l_c_t, [p for p in corr.parameters()])  # type: ignore[union-attr]
        elif l_tgt.requires_grad:
            _backward(l_tgt, None)
        out["loss/disc"] = (l_src + l_tgt).detach()

    out["loss/total"] = total
    if alpha is not None:
        out["attention/mean"] = alpha.detach().float().mean()
    return out, bool(disc_params)


def losses_finite(out: dict[str, Tensor]) -> Tensor:
    """A device boolean: whether every ``loss/*`` entry of ``out`` is finite (no host sync)."""
    vals = torch.stack([v.float() for k, v in out.items() if k.startswith("loss/")])
    return torch.isfinite(vals).all()


def apply_updates(seg_opt: torch.optim.Optimizer, disc_opt: torch.optim.Optimizer | None, disc_active: bool) -> None:
    """Phase 4: step the segmentor optimiser, and the discriminators' when they have gradients."""
    seg_opt.step()
    if disc_opt is not None and disc_active:
        disc_opt.step()


def train_step(
    models: StepModels,
    seg_opt: torch.optim.Optimizer,
    disc_opt: torch.optim.Optimizer | None,
    source_images: Tensor,
    source_labels: Tensor,
    target_images: Tensor,
    target_labels: Tensor | None,
    settings: StepSettings,
    autocast: Callable[[], ContextManager[object]],
    check_finite: bool = True,
) -> tuple[dict[str, Tensor], bool]:
    """Run one iteration. Returns (detached scalars for logging, whether it was applied).

    When ``check_finite`` and any loss is NaN or infinite, no parameter is updated and
    the second value is False (this check reads one flag back to the host).
    """
    out, disc_active = compute_gradients(models, seg_opt, disc_opt, source_images, source_labels,
                                         target_images, target_labels, settings, autocast)
    if check_finite and not bool(losses_finite(out)):
        seg_opt.zero_grad(set_to_none=True)
        if disc_opt is not None:
            disc_opt.zero_grad(set_to_none=True)
        return out, False
    apply_updates(seg_opt, disc_opt, disc_active)
    return out, True
