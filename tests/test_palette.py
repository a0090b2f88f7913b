"""One palette: prediction pictures and pseudo-label previews colour classes alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dast.config import SelfTrainingConfig
from dast.data.labels import cityscapes_table
from dast.execution import Execution
from dast.inference import visualize
from dast.models import build_discoverer, build_segmentor
from dast.models.target_model import TargetModel
from dast.palette import CITYSCAPES_COLORS, golden_color, palette_for
from dast.training import pseudo_labels


def test_cityscapes_colors_are_the_label_tables() -> None:
    assert CITYSCAPES_COLORS == cityscapes_table().colors
    assert pseudo_labels.CITYSCAPES_COLORS is CITYSCAPES_COLORS


def test_golden_color_hand_computed() -> None:
    assert golden_color(0) == (242, 24, 24)  # hsv(0, 0.9, 0.95): 0.95 * 255 = 242.25, 0.095 * 255 = 24.2
    assert golden_color(1)[2] == round(255 * 0.95)  # hue 0.618 (blue side), s 0.65, v 0.95: max channel is blue


@pytest.mark.parametrize("n", [3, 19, 40])
def test_palette_class_colour_does_not_depend_on_the_class_count(n: int) -> None:
    pal = palette_for(n)
    assert len(pal) == n
    assert pal[: min(n, 19)] == list(CITYSCAPES_COLORS[: min(n, 19)])
    assert pal[19:] == [golden_color(i) for i in range(19, n)]


def test_all_255_colours_are_distinct_and_not_black() -> None:
    pal = palette_for(255)
    assert len(set(pal)) == 255 and (0, 0, 0) not in pal


def test_both_module_paths_are_the_same_palette() -> None:
    assert visualize.palette_for is palette_for
    assert pseudo_labels.default_palette is palette_for


@pytest.mark.parametrize("n", [3, 19, 40])
def test_preview_png_and_prediction_colours_agree(n: int) -> None:
    """The pseudo-label preview (palette PNG) and visualize.colorize (RGB) draw each class alike."""
    label = np.array([list(range(n)) + [255]], np.uint8)
    preview = np.asarray(pseudo_labels.colorize(label, palette_for(n)).convert("RGB"))
    picture = visualize.colorize(label, visualize.palette_for(n))
    np.testing.assert_array_equal(preview, picture)
    assert preview[0, -1].tolist() == [0, 0, 0]  # ignore


@pytest.mark.parametrize("n", [3, 19, 40])
def test_generated_previews_use_the_palette(tmp_path: Path, n: int) -> None:
    torch.manual_seed(0)
    seg = build_segmentor("small", n)
    model = TargetModel(seg, build_discoverer(seg.feature_channels)).eval()
    ds = [{"image": torch.randn(3, 24, 40), "name": "img"}]
    pseudo_labels.generate_pseudo_labels(
        model,
        ds,
        tmp_path,
        SelfTrainingConfig(portion=1.0, cap=0.01, preview_count=1),
        execution=Execution(progress=False),
    )
    label = np.asarray(Image.open(tmp_path / "img.png"))
    assert len(np.unique(label)) > 1  # cap 0.01 labels every pixel with its argmax
    preview = np.asarray(Image.open(tmp_path / "preview" / "img_color.png").convert("RGB"))
    np.testing.assert_array_equal(preview, visualize.colorize(label, visualize.palette_for(n)))
