"""The deployable target-domain model: segmentor + discoverer attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
