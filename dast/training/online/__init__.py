"""Online self-training with a mean teacher (DACS, DAFormer, MIC): the recipe's building blocks.

Each module holds pure tensor functions (and one small class where state is unavoidable);
none reads a value back from the device on the training path:

* :mod:`.teacher`: the EMA teacher (:class:`Teacher`, :func:`ema_weight`, :func:`ema_update_`).
* :mod:`.pseudo`: the teacher's pseudo labels with the confidence weight, and the weighted
  cross-entropy (:func:`teacher_targets`, :func:`weighted_cross_entropy`).
* :mod:`.mixing`: ClassMix (:func:`classmix_masks`, :func:`mix`, :func:`mixed_weight`).
* :mod:`.augment`: the strong photometric augmentation of the mixed image
  (:class:`StrongAugment`, :func:`strong_augment`).
* :mod:`.sampling`: rare-class sampling of the source (class statistics, probabilities,
  :class:`RareClassSampler`, the crop rule, :class:`RareClassCrops`).
* :mod:`.masking`: MIC's block masks (:func:`block_mask`, :func:`scaled_block`).
* :mod:`.feature_distance`: DAFormer's ImageNet feature distance (:func:`feature_distance_loss`).

See ``docs/online.md``.
"""

from dast.training.online.augment import StrongAugment, StrongParams, apply_strong, draw_params, strong_augment
from dast.training.online.feature_distance import (
    THING_CLASSES,
    downscale_labels,
    feature_distance_loss,
    frozen_copy,
)
from dast.training.online.masking import block_mask, mask_images, scaled_block
from dast.training.online.mixing import classmix_masks, mix, mixed_weight
from dast.training.online.pseudo import teacher_targets, weighted_cross_entropy
from dast.training.online.sampling import (
    RareClassCrops,
    RareClassSampler,
    RarePlan,
    cached_class_pixels,
    class_pixel_counts,
    rare_class_crop,
    rcs_plan,
    rcs_probabilities,
)
from dast.training.online.teacher import Teacher, ema_update_, ema_weight

__all__ = [
    "THING_CLASSES",
    "RareClassCrops",
    "RareClassSampler",
    "RarePlan",
    "StrongAugment",
    "StrongParams",
    "Teacher",
    "apply_strong",
    "block_mask",
    "cached_class_pixels",
    "class_pixel_counts",
    "classmix_masks",
    "downscale_labels",
    "draw_params",
    "ema_update_",
    "ema_weight",
    "feature_distance_loss",
    "frozen_copy",
    "mask_images",
    "mix",
    "mixed_weight",
    "rare_class_crop",
    "rcs_plan",
    "rcs_probabilities",
    "scaled_block",
    "strong_augment",
    "teacher_targets",
    "weighted_cross_entropy",
]
