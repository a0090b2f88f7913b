"""ClassMix (DACS): paste half of a source image's classes onto a target image.

For each image ``b`` of the batch, with ``n_b`` the number of classes present in its source
label map (the ignore index excluded), ``ceil(n_b / 2)`` of those classes are chosen
uniformly at random without replacement; the mask is 1 on the source pixels of the chosen
classes. The mixed image, label and weight are then

    image  = mask * source_image + (1 - mask) * target_image
    label  = mask * source_label + (1 - mask) * pseudo_label
    weight = mask * 1            + (1 - mask) * teacher_weight

(source pixels are ground truth, so they weigh 1).

The choice runs on the device with fixed-size tensors and no host round trip: a presence
matrix ``[B, C]``, one random score per (image, class), absent classes scored above every
present one, ranks by a double ``argsort``, and "chosen" = present with rank < ceil(n/2).
The published code draws from the same distribution with ``torch.unique`` and
``np.random.choice``, which needs the class list on the host. (DAFormer's copy of it also
takes ``torch.unique`` of the whole batch, so an image may be offered classes it does not
hold and the ignore index; here each image chooses among its own classes, 255 excluded.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from dast.constants import IGNORE_INDEX


def class_presence(labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``present[b, c]``: whether class ``c`` occurs in ``labels[b]`` (B x H x W); B x C bool.

    Values outside ``0 .. num_classes - 1`` (the ignore index among them) count as no class.
    """
    if labels.dim() != 3:
        raise ValueError(f"label maps must be B x H x W, got shape {tuple(labels.shape)}")
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    valid = (flat >= 0) & (flat < num_classes) & (flat != ignore_index)
    index = torch.where(valid, flat, torch.full_like(flat, num_classes))  # the spare column
    counts = torch.zeros(b, num_classes + 1, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return counts[:, :num_classes] > 0


def choose_half(present: Tensor, scores: Tensor) -> Tensor:
    """Of each row's present classes, the ``ceil(n / 2)`` with the lowest ``scores``; B x C bool.

    ``scores`` (B x C, values in [0, 1)) are the random draws; absent classes are moved to
    score 2 so that the present ones take the first ranks.
    """
    if present.shape != scores.shape:
        raise ValueError(f"presence {tuple(present.shape)} and scores {tuple(scores.shape)} differ in shape")
    keyed = torch.where(present, scores, torch.full_like(scores, 2.0))
    rank = keyed.argsort(dim=1).argsort(dim=1)
    n = present.sum(dim=1, keepdim=True)
    return present & (rank < (n + 1) // 2)


def classmix_masks(
    labels: Tensor, generator: torch.Generator, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The ClassMix masks of a batch of source label maps (B x H x W): B x H x W bool, True on
    the pixels of the classes chosen by :func:`choose_half`.

    The scores are ``torch.rand(B, C, generator=generator)`` drawn on the generator's
    device (a CPU generator gives the same choice on every device; the draw is then copied
    to the labels' device, which needs no synchronisation).
    """
    present = class_presence(labels, num_classes, ignore_index)
    scores = torch.rand(present.shape, generator=generator, device=generator.device).to(labels.device)
    chosen = choose_half(present, scores)
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    valid = (flat >= 0) & (flat < num_classes)
    index = torch.where(valid, flat, torch.full_like(flat, num_classes))
    padded = torch.cat([chosen, torch.zeros(b, 1, dtype=torch.bool, device=chosen.device)], dim=1)
    return padded.gather(1, index).reshape(labels.shape)


def _as_mask_for(mask: Tensor, x: Tensor) -> Tensor:
    """``mask`` (B x H x W or B x 1 x H x W) shaped to broadcast against ``x``."""
    m = mask if mask.dim() == 3 else mask.reshape(mask.shape[0], *mask.shape[-2:])
    if m.dim() != 3:
        raise ValueError(f"a mix mask must be B x H x W or B x 1 x H x W, got shape {tuple(mask.shape)}")
    if x.dim() == 4:
        return m[:, None]
    if x.dim() == 3:
        return m
    raise ValueError(f"can mix B x C x H x W images or B x H x W maps, got shape {tuple(x.shape)}")


def mix(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``mask * a + (1 - mask) * b`` for a 0/1 ``mask`` (B x H x W or B x 1 x H x W, bool or
    float), computed as a selection so it is exact and keeps ``a``'s dtype (labels stay
    integers). ``a`` and ``b``: images B x C x H x W, or label/weight maps B x H x W."""
    if a.shape != b.shape:
        raise ValueError(f"cannot mix shapes {tuple(a.shape)} and {tuple(b.shape)}")
    m = _as_mask_for(mask, a)
    return torch.where(m.bool(), a, b)


def mixed_weight(mask: Tensor, target_weight: Tensor) -> Tensor:
    """The weight map of a mixed image: 1 on pasted source pixels, the teacher's weight elsewhere."""
    return mix(mask, torch.ones_like(target_weight), target_weight)
