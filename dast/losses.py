"""Loss functions of DAST as pure functions of tensors.

* :func:`segmentation_loss`: cross-entropy with ignore index on logits upsampled
  (bilinear, ``align_corners=True``) to the label size.
* :func:`lsgan_loss`: least-squares adversarial loss, mean of (out - target)^2,
  optionally weighted per location.
* :func:`bce_adversarial_loss`: the sigmoid cross-entropy of AdaptSegNet.
* :func:`adversarial_loss`: either of the two, chosen by name.
* :func:`resize_weight`: bring an attention map to a discriminator's output size.
* :func:`spatial_size`: the (height, width) of a tensor, the size argument of the above.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dast.constants import IGNORE_INDEX

AdvLossName = Literal["lsgan", "bce"]


def spatial_size(x: Tensor) -> tuple[int, int]:
    """(height, width): the last two dimensions of ``x``."""
    return x.shape[-2], x.shape[-1]


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling with ``align_corners=True`` to ``size`` = (height, width): the
    one rule by which every prediction of dast reaches label resolution."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over non-ignored pixels. ``logits`` N x C x H x W, ``labels`` N x H x W.

    Computed as sum / max(count, 1) without a host synchronisation, so it is 0 (not NaN)
    when every pixel is ignored and it can be captured in a CUDA graph.
    """
    labels = labels.long()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp_min(1)
    return total / count


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """L_seg: upsample ``logits`` to the label size (a no-op when they are already there),
    then :func:`cross_entropy`."""
    return cross_entropy(upsample(logits, spatial_size(labels)), labels, ignore_index)


def lsgan_loss(out: Tensor, target: float, weight: Tensor | None = None) -> Tensor:
    """Least-squares GAN loss: mean((out - target)^2), or mean(weight * (out - target)^2)."""
    sq = (out - target) ** 2
    if weight is None:
        return sq.mean()
    return (weight * sq).mean()


def bce_adversarial_loss(out: Tensor, target: float, weight: Tensor | None = None) -> Tensor:
    """Sigmoid cross-entropy against a constant domain label (AdaptSegNet)."""
    tgt = torch.full_like(out, float(target))
    return F.binary_cross_entropy_with_logits(out, tgt, weight=weight)


def adversarial_loss(name: AdvLossName, out: Tensor, target: float, weight: Tensor | None = None) -> Tensor:
    """Dispatch to :func:`lsgan_loss` or :func:`bce_adversarial_loss`."""
    if name == "lsgan":
        return lsgan_loss(out, target, weight)
    if name == "bce":
        return bce_adversarial_loss(out, target, weight)
    raise ValueError(f"unknown adversarial loss {name!r}")


def resize_weight(alpha: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize an attention map (N x 1 x h x w) to a discriminator output size.

    The result is detached: the attention weights the corrector loss but is not itself
    trained through it.
    """
    return upsample(alpha.detach(), size)


def attention_weighted_corrector_loss(name: AdvLossName, corrector_out: Tensor, target: float, alpha: Tensor) -> Tensor:
    """The paper's L_adv^C on target outputs, weighted per location by the attention map."""
    return adversarial_loss(name, corrector_out, target, resize_weight(alpha, spatial_size(corrector_out)))
