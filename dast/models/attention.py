"""Discriminator attention: f' = f + f * |tanh(D(f))|."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_map(discoverer_out: Tensor) -> Tensor:
    """The attention map alpha' = |tanh(D(f))|, shape N x 1 x h x w, values in [0, 1)."""
    return torch.abs(torch.tanh(discoverer_out))


def attend(features: Tensor, discoverer_out: Tensor) -> tuple[Tensor, Tensor]:
    """Residual attention of the paper: return (f + f * alpha', alpha').

    ``alpha'`` is broadcast over the channels of ``features``. Gradients flow into both
    ``features`` and ``discoverer_out``.
    """
    alpha = attention_map(discoverer_out)
    return features + alpha.expand_as(features) * features, alpha
