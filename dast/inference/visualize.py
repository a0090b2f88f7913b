"""Pictures of predictions: colourised labels, overlays, attention heatmaps, figure grids.

Everything here is a pure function on numpy arrays, except the ``save_*`` helpers,
which write PNG files atomically through :mod:`dast.atomic`. Matplotlib is used through
its object API only (``Figure`` + the Agg canvas); no global pyplot state is touched.
The class colours (:func:`palette_for`, :func:`generated_palette`, :func:`color_lut`) live
in :mod:`dast.palette` and are re-exported here.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dast.atomic import write_with
from dast.palette import Color, color_lut, generated_palette, palette_for

HEATMAP_CMAP = "inferno"

__all__ = [
    "Color",
    "color_lut",
    "colorize",
    "figure_grid",
    "generated_palette",
    "heatmap",
    "label_png_bytes",
    "overlay",
    "palette_for",
    "png_bytes",
    "save_png",
]


def colorize(label: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """H x W uint8 class map -> H x W x 3 uint8 RGB. 255 (ignore) and unknown ids are black."""
    lab = np.asarray(label)
    if lab.ndim != 2:
        raise ValueError(f"expected an H x W label map, got shape {lab.shape}")
    if lab.dtype != np.uint8:
        if lab.size and (lab.min() < 0 or lab.max() > 255):
            raise ValueError("label values must lie in 0..255")
        lab = lab.astype(np.uint8)
    return color_lut(colors)[lab]


def overlay(image_rgb: np.ndarray, label_color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised label over an RGB image: ``(1 - alpha) * image + alpha * colour``."""
    img = np.asarray(image_rgb)
    col = np.asarray(label_color)
    if img.shape != col.shape or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image {img.shape} and colour map {col.shape} must both be H x W x 3")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    mixed = (1.0 - alpha) * img.astype(np.float32) + alpha * col.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def heatmap(att: np.ndarray, cmap: str = HEATMAP_CMAP) -> np.ndarray:
    """H x W values in [0, 1] -> H x W x 3 uint8 through a perceptual colormap.

    Values outside [0, 1] are clipped; NaN is drawn as 0.
    """
    from matplotlib import colormaps  # noqa: PLC0415 - heavy: matplotlib

    a = np.asarray(att, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected an H x W attention map, got shape {a.shape}")
    a = np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.ascontiguousarray(colormaps[cmap](a, bytes=True)[..., :3])


def _pil_image(array: np.ndarray) -> Image.Image:
    arr = np.ascontiguousarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"PNG arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3):
        return Image.fromarray(arr)  # uint8: 2-D -> "L", H x W x 3 -> "RGB"
    raise ValueError(f"PNG arrays must be H x W or H x W x 3, got shape {arr.shape}")


def png_bytes(array: np.ndarray) -> bytes:
    """Encode an H x W (grey / label) or H x W x 3 (RGB) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    _pil_image(array).save(buf, format="PNG")
    return buf.getvalue()


def label_png_bytes(label: np.ndarray) -> bytes:
    """Encode an H x W uint8 class map as a single-channel 8-bit PNG."""
    lab = np.asarray(label)
    if lab.ndim != 2 or lab.dtype != np.uint8:
        raise ValueError(f"a label PNG needs an H x W uint8 array, got {lab.dtype} {lab.shape}")
    return png_bytes(lab)


def save_png(path: str | os.PathLike[str], array: np.ndarray, fsync: bool = True) -> None:
    """Write an H x W or H x W x 3 uint8 array as a PNG file, atomically."""
    img = _pil_image(array)
    write_with(path, lambda tmp: img.save(tmp, format="PNG"), fsync=fsync)


def figure_grid(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str] | None = None,
    cell_width: float = 3.0,
    dpi: int = 100,
) -> None:
    """Save a grid of images (one list per row) with a title above each column, as PNG.

    Cells are H x W (drawn in grey) or H x W x 3 uint8 arrays. All rows must have
    ``len(titles)`` cells. The figure is drawn with matplotlib's Agg canvas and written
    atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - heavy: matplotlib
    from matplotlib.figure import Figure  # noqa: PLC0415 - heavy: matplotlib

    if not rows:
        raise ValueError("figure_grid needs at least one row")
    ncols = len(titles)
    for r, row in enumerate(rows):
        if len(row) != ncols:
            raise ValueError(f"row {r} has {len(row)} images but there are {ncols} column titles")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    h0, w0 = np.asarray(rows[0][0]).shape[:2]
    cell_height = cell_width * h0 / max(w0, 1)
    fig = Figure(figsize=(cell_width * ncols, cell_height * len(rows) + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            ax = axes[r][c]
            arr = np.asarray(cell)
            if arr.ndim == 2:
                ax.imshow(arr, cmap="gray", interpolation="nearest")
            else:
                ax.imshow(arr, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=10)
    fig.tight_layout()

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)

    write_with(path, _write)
