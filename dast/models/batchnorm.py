"""Per-image BatchNorm: the paper's normalisation (batch 1) at any batch size.

The paper trains with one image per batch, so every BatchNorm layer normalises each
image with its own statistics. With a batch of N images, plain BatchNorm pools the
statistics of all N. :class:`PerImageBatchNorm2d` normalises each image separately in
training mode and updates the running statistics once per image, in batch order; in
eval mode it is plain BatchNorm. Its state dict is that of ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dast.errors import ConfigError


class PerImageBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises each image of a batch on its own when training."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[0] == 1:
            return super().forward(x)
        return torch.cat([super(PerImageBatchNorm2d, self).forward(x[i : i + 1]) for i in range(x.shape[0])])


def use_per_image_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`PerImageBatchNorm2d` in place.

    Subclasses of BatchNorm2d (timm's ``BatchNormAct2d`` in EfficientNet, MobileNet,
    RegNet ...) have their own forward and would keep pooling the batch's statistics:
    such a network is a ConfigError, and nothing is replaced.
    """
    others = sorted(
        {
            type(m).__name__
            for m in module.modules()
            if isinstance(m, nn.BatchNorm2d) and type(m) not in (nn.BatchNorm2d, PerImageBatchNorm2d)
        }
    )
    if others:
        raise ConfigError(
            f"model.batchnorm: per_image replaces plain BatchNorm2d layers only, and this network also "
            f"has {', '.join(others)}; use model.batchnorm: batch (or train.batch_size: 1)"
        )
    _replace_batchnorm(module)
    return module


def _replace_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = PerImageBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            new.to(next(iter(child.buffers())).device)
            setattr(module, name, new)
        else:
            _replace_batchnorm(child)
