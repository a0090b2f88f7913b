"""Masked image consistency (MIC): random block masks for the target image.

The student sees the target image with random square blocks blanked out and is trained
against the teacher's pseudo labels of the full image, so it must use context. MIC's block
mask splits the image into ``block x block`` cells and keeps each cell with probability
``1 - ratio`` (published: ratio 0.7, block 64 at 1024x1024 crops). A masked pixel is set to
0 in the normalised input, i.e. to the normalisation's mean colour (MIC multiplies the
normalised image by the mask).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_RATIO = 0.7  # MIC mask_ratio
DEFAULT_BLOCK = 64  # MIC mask_block_size at 1024 x 1024
REFERENCE_SIZE = (1024, 1024)  # the crop size the published block refers to


def block_mask(
    batch: int,
    height: int,
    width: int,
    ratio: float,
    block: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """A B x 1 x H x W float mask of 0/1 blocks: cell (i, j) covers rows ``[i*block, (i+1)*block)``
    and columns ``[j*block, (j+1)*block)`` (the last row/column of cells is cut at the image
    border) and is 1 (kept) where ``u >= ratio``, ``u ~ U[0, 1)`` per cell. So a cell is kept
    with probability ``1 - ratio``; ratio 0 keeps everything and ratio 1 nothing, exactly.

    The uniforms are drawn on the generator's device, ``ceil(H / block) x ceil(W / block)``
    per image, then copied to ``device``. (MIC draws ``round(H / block)`` cells and resizes
    them to H x W with nearest interpolation: the same layout when ``block`` divides H and W.)
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the mask ratio must be in [0, 1], got {ratio}")
    if block < 1:
        raise ValueError(f"the mask block must be >= 1 pixel, got {block}")
    cells_h, cells_w = math.ceil(height / block), math.ceil(width / block)
    u = torch.rand(batch, 1, cells_h, cells_w, generator=generator, device=generator.device)
    cells = (u >= ratio).float()
    mask = cells.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)[:, :, :height, :width]
    return mask.to(device) if device is not None else mask


def scaled_block(block: int, size: tuple[int, int], reference: tuple[int, int] = REFERENCE_SIZE) -> int:
    """The block size for images of ``size`` = (height, width): ``block`` scaled by
    ``sqrt(H * W / (H_ref * W_ref))`` and rounded, at least 1.

    The rule keeps the number of cells per image (and so the mask's granularity relative to
    the image) equal to the published setting's: 64 at 1024 x 1024 gives 256 cells; at
    1024 x 512 (the Cityscapes size DAST uses) it gives 45, at 512 x 512 32.
    """
    h, w = size
    rh, rw = reference
    if min(h, w, rh, rw) < 1:
        raise ValueError(f"sizes must be positive, got {size} and reference {reference}")
    return max(1, round(block * math.sqrt((h * w) / (rh * rw))))


def mask_images(images: Tensor, mask: Tensor) -> Tensor:
    """``images * mask``: masked pixels become 0 in the normalised input (the mean colour)."""
    return images * mask.to(dtype=images.dtype, device=images.device)
