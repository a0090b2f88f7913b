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


class PerImageBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises each image of a batch on its own when training."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[0] == 1:
            return super().forward(x)
        return torch.cat([super(PerImageBatchNorm2d, self).forward(x[i : i + 1]) for i in range(x.shape[0])])


def use_per_image_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`PerImageBatchNorm2d` in place."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = PerImageBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            new.to(next(iter(child.buffers())).device)
            setattr(module, name, new)
        else:
            use_per_image_batchnorm(child)
    return module
