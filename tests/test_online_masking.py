"""MIC block masks: ratio 0 and 1 exactly, the block layout, the keep rate, the scaled block."""

from __future__ import annotations

import pytest
import torch

from dast.training.online.masking import block_mask, mask_images, scaled_block


def test_ratio_zero_keeps_everything_and_ratio_one_nothing():
    g = torch.Generator().manual_seed(0)
    keep = block_mask(3, 10, 7, ratio=0.0, block=4, generator=g)
    assert keep.shape == (3, 1, 10, 7) and keep.dtype == torch.float32
    assert torch.equal(keep, torch.ones(3, 1, 10, 7))
    assert torch.equal(block_mask(3, 10, 7, ratio=1.0, block=4, generator=g), torch.zeros(3, 1, 10, 7))


def test_blocks_are_constant_cells_cut_at_the_border():
    g = torch.Generator().manual_seed(1)
    mask = block_mask(2, 10, 6, ratio=0.5, block=4, generator=g)  # 3 x 2 cells, the last cut
    cells = torch.rand(2, 1, 3, 2, generator=torch.Generator().manual_seed(1)) >= 0.5
    for b in range(2):
        for i in range(3):
            for j in range(2):
                patch = mask[b, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                assert patch.numel() == min(4, 10 - 4 * i) * min(4, 6 - 4 * j)
                assert torch.all(patch == float(cells[b, 0, i, j])), (b, i, j)
    # the same generator state gives the same mask
    assert torch.equal(block_mask(2, 10, 6, 0.5, 4, torch.Generator().manual_seed(1)), mask)


def test_a_cell_is_kept_with_probability_one_minus_ratio():
    mask = block_mask(50, 64, 64, ratio=0.7, block=8, generator=torch.Generator().manual_seed(2))
    assert abs(mask.mean().item() - 0.3) < 0.02  # 3200 cells
    with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\], got 1.2"):
        block_mask(1, 4, 4, 1.2, 2, torch.Generator())


def test_scaled_block_keeps_the_number_of_cells():
    assert scaled_block(64, (1024, 1024)) == 64
    assert scaled_block(64, (512, 512)) == 32
    assert scaled_block(64, (512, 1024)) == round(64 * 0.5**0.5) == 45
    assert scaled_block(64, (720, 1280)) == round(64 * (720 * 1280 / 1024**2) ** 0.5) == 60
    assert scaled_block(64, (8, 8)) == 1  # never below one pixel
    assert scaled_block(32, (512, 512), reference=(512, 512)) == 32


def test_mask_images_zeroes_the_masked_pixels():
    x = torch.arange(8.0).reshape(1, 2, 2, 2)
    m = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert mask_images(x, m).tolist() == [[[[0.0, 0.0], [0.0, 3.0]], [[4.0, 0.0], [0.0, 7.0]]]]
