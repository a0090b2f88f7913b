"""The teacher's pseudo labels and the confidence-weighted cross-entropy (DACS, DAFormer).

The teacher predicts on the un-augmented target image. Its pseudo label is the argmax of
the softmax, and every pixel of the batch gets the same weight: the share of the batch's
pixels whose highest probability is ``>= threshold`` (DACS/DAFormer: 0.968). Optionally the
first ``ignore_top`` and last ``ignore_bottom`` pixel rows get weight 0 (DAFormer uses
this against rectification artefacts at the image borders: 15 and 120 rows at 512x512 for
Cityscapes). The student's loss on the (mixed, augmented) image is the mean over all
pixels of ``weight * CE``.

Everything stays on the device: no ``.item()``, no boolean indexing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dast.constants import IGNORE_INDEX
from dast.losses import spatial_size, upsample

DEFAULT_THRESHOLD = 0.968  # DACS / DAFormer pseudo_threshold


def confidence_share(confidence: Tensor, threshold: float) -> Tensor:
    """The share of elements with ``confidence >= threshold``: one 0-d float32 tensor."""
    return (confidence >= threshold).float().mean()


def teacher_targets(
    logits: Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    ignore_top: int = 0,
    ignore_bottom: int = 0,
    size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Pseudo labels and their weights from the teacher's ``logits`` (B x C x h x w).

    With ``p = softmax(logits)`` over the classes (in float32), per pixel:

    * ``labels = argmax_c p`` (B x H x W, int64; the first class on ties);
    * ``weight = mean over the batch's pixels of [max_c p >= threshold]``: one scalar for
      the whole batch, as DACS and DAFormer compute it (note the ``>=``), broadcast to
      B x H x W float32; then rows ``[0, ignore_top)`` and ``[H - ignore_bottom, H)`` are
      set to 0 (after the share is computed, so those rows still count in it).

    ``size`` = (height, width), when given, first upsamples the logits to it (bilinear,
    ``align_corners=True``, as everywhere in dast); otherwise H x W = h x w.
    """
    if logits.dim() != 4:
        raise ValueError(f"teacher logits must be B x C x H x W, got shape {tuple(logits.shape)}")
    if ignore_top < 0 or ignore_bottom < 0:
        raise ValueError(f"ignore_top and ignore_bottom must be >= 0, got {ignore_top} and {ignore_bottom}")
    if size is not None:
        logits = upsample(logits, size)
    prob = torch.softmax(logits.detach().float(), dim=1)
    confidence, labels = prob.max(dim=1)
    weight = confidence_share(confidence, threshold).expand_as(confidence).clone()
    height = weight.shape[1]
    if ignore_top > 0:
        weight[:, : min(ignore_top, height)] = 0.0
    if ignore_bottom > 0:
        weight[:, max(height - ignore_bottom, 0) :] = 0.0
    return labels, weight


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``mean over all B x H x W pixels of weight * CE(logits, labels)``.

    ``logits`` are upsampled to the label size first (bilinear, ``align_corners=True``).
    Pixels labelled ``ignore_index`` have CE 0 but still count in the mean (as mmseg's
    weighted loss does in DACS/DAFormer), so the loss does not grow when fewer pixels
    are labelled.
    """
    if labels.shape != weight.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and weight {tuple(weight.shape)} differ in shape")
    ce = F.cross_entropy(
        upsample(logits, spatial_size(labels)).float(), labels.long(), ignore_index=ignore_index, reduction="none"
    )
    return (weight * ce).mean()
