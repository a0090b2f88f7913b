"""The deployable target-domain model: segmentor + discoverer attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dast.contexts import autocast
from dast.losses import spatial_size, upsample
from dast.models.attention import attend
from dast.models.discriminators import Discoverer
from dast.models.segmentor import Segmentor


class TargetModel(nn.Module):
    """Inference on target images: f = E(x), f' = f + f*|tanh(D(f))|, logits = P(f').

    Without a discoverer (source-only and output-space-only models) the attention is
    zero and the model is the plain segmentor.
    """

    def __init__(self, segmentor: Segmentor, discoverer: Discoverer | None = None) -> None:
        super().__init__()
        self.segmentor = segmentor
        self.discoverer = discoverer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (logits at feature resolution, attention map N x 1 x h x w)."""
        f = self.segmentor.extract(x)
        if self.discoverer is None:
            alpha = torch.zeros_like(f[:, :1])
            return self.segmentor.predict(f), alpha
        f_att, alpha = attend(f, self.discoverer(f))
        return self.segmentor.predict(f_att), alpha


def predict_full_res(
    model: nn.Module, x: Tensor, size: tuple[int, int] | None = None, amp_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """The one forward-and-upsample rule: run the target model on ``x`` (under autocast to
    ``amp_dtype`` when given) and upsample its float32 logits and attention bilinearly
    (``align_corners=True``) to ``size`` = (height, width), the input size by default.

    Returns (logits N x C x H x W, attention N x 1 x H x W; zeros for a model that returns no
    attention). No gradients are recorded.
    """
    out_size = spatial_size(x) if size is None else (int(size[0]), int(size[1]))
    with torch.no_grad():
        with autocast(x.device, amp_dtype):
            logits, alpha = model(x)
        up = upsample(logits.float(), out_size)
        if alpha is None:  # a model without attention (a plain segmentor wrapped to return a pair)
            return up, torch.zeros_like(up[:, :1])
        return up, upsample(alpha.float(), out_size)
