"""The online stage: the recipe's losses inside the DAST step, and the teacher as a hook.

* :class:`OnlineRecipe` is the step's :class:`~dast.training.step.ExtraLosses`. Per
  iteration, on top of L_seg on the source and (``online.adversarial: keep``) the DAST
  adversarial terms on the target:

  1. the teacher labels the un-augmented target images (:func:`teacher_targets`): argmax
     labels, and the share of confident pixels as their weight;
  2. ClassMix pastes half of each source image's classes onto its target image, with the
     labels and weights mixed alike (source pixels weigh 1); source images of another size
     are resized to the target's first (bilinear; labels nearest);
  3. the strong augmentation (colour jitter, blur) of the mixed images;
  4. ``online.weight`` x the weighted cross-entropy of the student on them (``loss/online``);
  5. optionally masked image consistency (``loss/masked``): the student on the target
     images with random blocks masked, against the teacher's labels;
  6. optionally the feature distance on the source features (``loss/feature_distance``).

  The student's forward passes take the target path (E, the discriminator attention when
  the model has one, P); so does the teacher's. Every random draw comes from a CPU
  generator seeded by (seed, step, rank): a resumed run draws the same mixes.
* :class:`TeacherHook` owns the teacher's schedule and state: after every applied step it
  moves the teacher towards the student (EMA, :class:`Teacher`), keeps it identical on
  every rank under DDP, and puts it in the checkpoints.

Nothing here reads a value back to the host on the training path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dast.config import Config, FeatureDistanceConfig, MaskingConfig
from dast.constants import IGNORE_INDEX
from dast.errors import CheckpointError
from dast.models.io import Networks, load_networks
from dast.models.target_model import TargetModel
from dast.training.engine import StepResult
from dast.training.hooks import Hook, StageView, parameter_digest, write_digest
from dast.training.online.augment import StrongAugment, strong_augment
from dast.training.online.feature_distance import feature_distance_loss, frozen_copy
from dast.training.online.masking import block_mask, mask_images, scaled_block
from dast.training.online.mixing import classmix_masks, mix, mixed_weight
from dast.training.online.pseudo import teacher_targets, weighted_cross_entropy
from dast.training.online.teacher import Teacher, ema_weight
from dast.training.setup import initial_networks, model_spec_for
from dast.training.step import Autocast, Batch


@dataclass(frozen=True, kw_only=True)
class RecipeSettings:
    """The recipe's settings, from ``self_training.online`` and the model."""

    num_classes: int
    norm: str
    threshold: float
    ignore_top: int
    ignore_bottom: int
    weight: float
    classmix: bool
    augment: StrongAugment | None  # None: no strong augmentation
    masking: MaskingConfig | None
    feature_distance: FeatureDistanceConfig | None

    @classmethod
    def from_config(cls, cfg: Config) -> RecipeSettings:
        on = cfg.self_training.online
        aug = on.augment
        strong = StrongAugment(
            jitter=aug.jitter > 0, jitter_strength=aug.jitter, jitter_prob=aug.jitter_prob, blur=aug.blur
        )
        return cls(
            num_classes=cfg.model.num_classes,
            norm=cfg.model.norm,
            threshold=on.threshold,
            ignore_top=on.ignore_top,
            ignore_bottom=on.ignore_bottom,
            weight=on.weight,
            classmix=on.classmix,
            augment=strong if (strong.jitter or strong.blur) else None,
            masking=on.masking,
            feature_distance=on.feature_distance,
        )


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of iteration ``step`` on ``rank``: a pure function of the three."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) % (2**63 - 1))


def _like_target(batch: Batch) -> tuple[Tensor, Tensor]:
    """The source images and labels at the target images' size (unchanged when it matches)."""
    size = tuple(batch.xt.shape[-2:])
    if tuple(batch.xs.shape[-2:]) == size:
        return batch.xs, batch.ys
    xs = F.interpolate(batch.xs, size=size, mode="bilinear", align_corners=True)
    ys = F.interpolate(batch.ys[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return xs.to(batch.xt.dtype), ys


class OnlineRecipe:
    """The online stage's extra losses (see the module docstring)."""

    def __init__(
        self,
        settings: RecipeSettings,
        teacher: Teacher,
        autocast: Autocast,
        *,
        frozen: nn.Module | None = None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.settings, self.teacher, self.autocast, self.frozen = settings, teacher, autocast, frozen
        self.seed, self.rank = int(seed), int(rank)
        self.generator = step_generator(self.seed, 0, self.rank)

    def begin(self, step: int) -> None:
        """Draw iteration ``step``'s random numbers from its own generator."""
        self.generator = step_generator(self.seed, step, self.rank)

    def targets(self, images: Tensor, out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The teacher's (labels, weights) for target ``images``, at their size."""
        s = self.settings
        with torch.no_grad(), self.autocast():
            logits, _ = self.teacher.predict(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        labels, weight = teacher_targets(logits.float(), s.threshold, s.ignore_top, s.ignore_bottom, size=size)
        out["online/confident_share"] = weight.amax().detach()  # the weight of every counted pixel
        return labels, weight

    def source_loss(self, features: Tensor, batch: Batch, out: dict[str, Tensor]) -> Tensor | None:
        fd = self.settings.feature_distance
        if fd is None or self.frozen is None:
            return None
        with torch.no_grad(), self.autocast():
            frozen = self.frozen(batch.xs)
        loss = feature_distance_loss(features, frozen, batch.ys, fd.classes, fd.weight, self.settings.num_classes)
        out["loss/feature_distance"] = loss.detach()
        return loss

    def loss_fns(
        self, student: Callable[[Tensor], Tensor], batch: Batch, out: dict[str, Tensor]
    ) -> list[Callable[[], Tensor]]:
        labels, weight = self.targets(batch.xt, out)
        fns = [lambda: self._mixed_loss(student, batch, labels, weight, out)]
        if self.settings.masking is not None:
            fns.append(lambda: self._masked_loss(student, batch, labels, weight, out))
        return fns

    def _mixed_loss(
        self, student: Callable[[Tensor], Tensor], batch: Batch, labels: Tensor, weight: Tensor, out: dict[str, Tensor]
    ) -> Tensor:
        s, images = self.settings, batch.xt
        if s.classmix:
            xs, ys = _like_target(batch)
            mask = classmix_masks(ys, self.generator, s.num_classes, IGNORE_INDEX)
            images, labels, weight = mix(mask, xs, images), mix(mask, ys, labels), mixed_weight(mask, weight)
        if s.augment is not None:
            images = strong_augment(images, s.norm, self.generator, s.augment)
        loss = s.weight * weighted_cross_entropy(student(images).float(), labels, weight)
        out["loss/online"] = loss.detach()
        return loss

    def _masked_loss(
        self, student: Callable[[Tensor], Tensor], batch: Batch, labels: Tensor, weight: Tensor, out: dict[str, Tensor]
    ) -> Tensor:
        m = self.settings.masking
        assert m is not None
        b, _, h, w = batch.xt.shape
        mask = block_mask(b, h, w, m.ratio, scaled_block(m.block, (h, w)), self.generator, batch.xt.device)
        loss = m.weight * weighted_cross_entropy(student(mask_images(batch.xt, mask)).float(), labels, weight)
        out["loss/masked"] = loss.detach()
        return loss


class TeacherHook(Hook):
    """The teacher's EMA after every applied step, its agreement across ranks, its checkpoint."""

    name = "teacher"

    def __init__(self, recipe: OnlineRecipe, student: nn.Module, alpha: float) -> None:
        self.recipe, self.student, self.alpha = recipe, student, alpha

    def before_step(self, loop: StageView) -> None:
        self.recipe.begin(loop.state.step)

    def after_step(self, loop: StageView, result: StepResult) -> None:
        if not result.applied:
            return
        teacher = self.recipe.teacher
        teacher.update(self.student, result.step + 1)  # the student has taken step + 1 updates
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for b in teacher.module.buffers():  # BatchNorm statistics differ per rank: rank 0's
                dist.broadcast(b, src=0)
        result.scalars["online/ema"] = torch.tensor(ema_weight(result.step + 1, self.alpha))
        every = loop.cfg.train.digest_every
        if every and loop.state.step % every == 0:  # the teacher must be the same on every rank
            digest = parameter_digest({"teacher": teacher.module}, buffers=True)
            write_digest(loop.run_digests, loop.plan.name, loop.state.step, digest)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.recipe.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weights" in state:
            self.recipe.teacher.load_state_dict(state["weights"])


def online_parts(
    cfg: Config, nets: Networks, autocast: Autocast, rank: int, log: logging.Logger | None = None
) -> tuple[OnlineRecipe, TeacherHook]:
    """The recipe and the teacher hook of an online stage that starts from ``nets`` as they
    are (the teacher starts as their copy)."""
    settings = RecipeSettings.from_config(cfg)
    student = TargetModel(nets.segmentor, nets.discoverer if nets.spec.attention else None)
    teacher = Teacher(student, alpha=cfg.self_training.online.ema)
    frozen = None
    if settings.feature_distance is not None:
        if cfg.model.init:
            frozen = frozen_copy(initial_networks(cfg, model_spec_for(cfg)).segmentor.encoder)
        else:
            if log is not None:
                log.warning(
                    "online feature distance without model.init: the frozen encoder is the online stage's start"
                )
            frozen = frozen_copy(nets.segmentor.encoder)
        frozen.to(next(nets.segmentor.parameters()).device)
    recipe = OnlineRecipe(settings, teacher, autocast, frozen=frozen, seed=cfg.seed, rank=rank)
    return recipe, TeacherHook(recipe, student, cfg.self_training.online.ema)


def teacher_networks(checkpoint: str | Path, device: str | torch.device = "cpu") -> Networks:
    """The teacher stored in an online stage's training checkpoint, as networks (the
    checkpoint's model description with the teacher's weights); for analysis and figures."""
    nets, tensors, meta = load_networks(checkpoint, device)
    refs = (meta.get("hooks") or {}).get(TeacherHook.name, {}).get("weights")
    if not refs:
        raise CheckpointError(f"{checkpoint} holds no teacher (not a checkpoint of an online stage)")
    teacher = {name: tensors[ref["$tensor"]] for name, ref in refs.items()}
    TargetModel(nets.segmentor, nets.discoverer if nets.spec.attention else None).load_state_dict(teacher)
    return nets.to(device)
