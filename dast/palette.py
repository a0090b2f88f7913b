"""Class colours: the one palette behind every picture the project draws.

:func:`palette_for` gives class ``i`` the same colour whatever the class count: the
Cityscapes train-id colour for ``i < 19`` (road, sidewalk, ... bicycle), and beyond that a
colour from a golden-ratio hue sequence (:func:`golden_color`). Colours a dataset or a
checkpoint names itself take precedence. The prediction pictures (:mod:`dast.inference.visualize`)
and the pseudo-label previews (:mod:`dast.training.pseudo_labels`) both draw with it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Sequence

import numpy as np

from dast.constants import IGNORE_INDEX

Color = tuple[int, int, int]

# Cityscapes train-id colours (road ... bicycle); tests/test_palette.py checks them
# against the cityscapesscripts label table.
CITYSCAPES_COLORS: tuple[Color, ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

_GOLDEN = 0.618033988749895


def as_color(values: Iterable[float]) -> Color:
    """Three numbers as an (R, G, B) tuple of ints (a ValueError for any other count)."""
    r, g, b = (int(v) for v in values)
    return r, g, b


def golden_color(i: int) -> Color:
    """Colour ``i`` of a fixed sequence: hue ``i * 0.618... mod 1`` with alternating
    saturation (0.9, 0.65) and brightness (0.95, 0.95, 0.7, 0.7, ...); never black."""
    hue = (i * _GOLDEN) % 1.0
    sat = 0.65 if i % 2 else 0.9
    val = 0.95 if (i // 2) % 2 == 0 else 0.7
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(round(255 * r)), int(round(255 * g)), int(round(255 * b))


def generated_palette(num_classes: int) -> list[Color]:
    """A fixed, distinct palette without the Cityscapes colours; never pure black.

    Up to 20 classes use matplotlib's qualitative ``tab20`` colours (the ``tab10`` hues
    first); beyond that, :func:`golden_color` ``0 .. n-1``.
    """
    from matplotlib import colormaps  # noqa: PLC0415 - heavy: matplotlib; only this palette needs it

    if num_classes <= 0:
        return []
    if num_classes <= 20:
        tab20 = colormaps["tab20"]  # a listed colormap: tab20(i) is its colour i (RGBA)
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # saturated hues, then light ones
        return [as_color(round(255 * c) for c in tab20(i)[:3]) for i in order[:num_classes]]
    return [golden_color(i) for i in range(num_classes)]


def palette_for(num_classes: int, colors: Sequence[Sequence[int]] | None = None) -> list[Color]:
    """Colours for ``num_classes`` classes.

    Given ``colors`` (one RGB triple per class) are used as they are. Otherwise class ``i``
    gets ``CITYSCAPES_COLORS[i]`` for ``i < 19`` and :func:`golden_color` ``(i)`` above, so
    a class keeps its colour whatever the class count (all 255 colours are distinct).
    """
    if colors:
        if len(colors) != num_classes:
            raise ValueError(f"{len(colors)} class colours given for {num_classes} classes")
        return [as_color(c) for c in colors]
    return [CITYSCAPES_COLORS[i] if i < len(CITYSCAPES_COLORS) else golden_color(i) for i in range(num_classes)]


def color_lut(colors: Sequence[Sequence[int]]) -> np.ndarray:
    """A 256 x 3 uint8 lookup table: class ``i`` -> ``colors[i]``; every other value -> black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    arr = np.asarray(colors, dtype=np.int64).reshape(-1, 3) if len(colors) else np.zeros((0, 3), np.int64)
    if len(arr) > IGNORE_INDEX:
        raise ValueError(f"at most {IGNORE_INDEX} classes can be coloured, got {len(arr)}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("class colours must be RGB triples in 0..255")
    lut[: len(arr)] = arr.astype(np.uint8)
    return lut
