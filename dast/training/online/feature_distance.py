"""ImageNet feature distance (DAFormer): keep the encoder's features on source images close
to those of the frozen initial (ImageNet) encoder, on the "thing" classes.

With ``f`` the student's and ``f0`` the frozen encoder's features (B x C x h x w) of the
same source images:

    d[b, y, x] = || f[b, :, y, x] - f0[b, :, y, x] ||_2
    L = weight * sum(d * m) / max(sum(m), 1)

where ``m`` marks the feature pixels whose *downscaled* source label is one of ``classes``.
A feature pixel takes the class that covers at least ``min_ratio`` (0.75) of its patch of
the label map; if no class does, it is ignored (:func:`downscale_labels`). Published: weight
0.005 on the Cityscapes train ids 6, 7, 11 .. 18 (traffic light, traffic sign, person,
rider, car, truck, bus, train, motorcycle, bicycle).

The mask is applied by sums, not boolean indexing, so nothing waits for the device; when
no feature pixel is in the classes the loss is 0 (DAFormer's mean over an empty selection
is NaN).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dast.constants import IGNORE_INDEX

THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # Cityscapes train ids (DAFormer)
DEFAULT_WEIGHT = 0.005  # DAFormer imnet_feature_dist_lambda
DEFAULT_MIN_RATIO = 0.75  # DAFormer imnet_feature_dist_scale_min_ratio


def downscale_labels(
    labels: Tensor,
    size: tuple[int, int],
    num_classes: int,
    min_ratio: float = DEFAULT_MIN_RATIO,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Label maps B x H x W -> B x h x w for ``size`` = (h, w).

    Each output pixel covers a patch of the input (rows ``[floor(i H / h), ceil((i+1) H / h))``,
    likewise for columns: adaptive average pooling, which is DAFormer's ``avg_pool2d`` with
    kernel = stride = H / h when that divides). Per patch, with the ignored pixels counted as
    one more class: the label is the class with the largest share (the first on ties), or
    ``ignore_index`` if that is the ignored pixels or its share is below ``min_ratio``.
    """
    if labels.dim() != 3:
        raise ValueError(f"label maps must be B x H x W, got shape {tuple(labels.shape)}")
    b, height, width = labels.shape
    flat = labels.long()
    valid = (flat >= 0) & (flat < num_classes)
    index = torch.where(valid, flat, torch.full_like(flat, num_classes))
    onehot = torch.zeros(b, num_classes + 1, height, width, device=labels.device)
    onehot.scatter_(1, index[:, None], 1.0)
    share = F.adaptive_avg_pool2d(onehot, size)
    ratio, label = share.max(dim=1)
    keep = (label < num_classes) & (ratio >= min_ratio)
    return torch.where(keep, label, torch.full_like(label, ignore_index))


def class_mask(labels: Tensor, classes: Sequence[int] | Tensor) -> Tensor:
    """``labels`` in ``classes``, as float 0/1 of the labels' shape."""
    wanted = torch.as_tensor(classes, dtype=torch.long).to(labels.device)
    return torch.isin(labels, wanted).float()


def feature_distance_loss(
    features: Tensor,
    frozen_features: Tensor,
    labels: Tensor,
    classes: Sequence[int] | Tensor = THING_CLASSES,
    weight: float = DEFAULT_WEIGHT,
    num_classes: int = 19,
    min_ratio: float = DEFAULT_MIN_RATIO,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``weight * mean over the masked feature pixels of ||features - frozen_features||_2``
    (see the module docstring); ``labels`` are the source label maps B x H x W at input size.
    The frozen features are detached. Returns a 0-d tensor."""
    if features.shape != frozen_features.shape:
        raise ValueError(f"feature shapes differ: {tuple(features.shape)} and {tuple(frozen_features.shape)}")
    if features.dim() != 4 or labels.dim() != 3 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"need B x C x h x w features and B x H x W labels, got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    diff = features.float() - frozen_features.detach().float()
    distance = torch.linalg.vector_norm(diff, ord=2, dim=1)
    small = downscale_labels(labels, (features.shape[-2], features.shape[-1]), num_classes, min_ratio, ignore_index)
    mask = class_mask(small, classes)
    return float(weight) * (distance * mask).sum() / mask.sum().clamp_min(1.0)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with every parameter frozen (the initial encoder
    that :func:`feature_distance_loss` compares against; run it under ``torch.no_grad()``)."""
    frozen = copy.deepcopy(module)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen.eval()
