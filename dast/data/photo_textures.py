"""Photographic surface textures for the ``photographic`` target domain of the synthetic demo.

The textures are crops (*swatches*) of the sample photographs that ship inside
scikit-image's wheel (the ``skimage/data`` folder of the installed package: brick, gravel,
grass, the cameraman's sky and coat, the astronaut's suit, face and helmet, the coffee
table's wood and saucer, the dusk sky of the rocket launch). They are read straight from
that folder with Pillow: scikit-image's own loaders (which may fetch files with pooch) are
never called, so nothing is downloaded, ever. Each photograph is read once per process
(:func:`photo`, cached) and turned into a mip pyramid once (:func:`texture`, cached).

A swatch is normalised to a mean luminance of 1, so a surface's colour is its *tint* (from
the domain's palette) times the photograph's texture (:func:`shade`). :func:`sample` reads a
texture at arbitrary texel coordinates (mirrored tiling, so no seams) from the pyramid level
that matches each pixel's footprint, which keeps far surfaces from aliasing.

Where each photograph comes from and its licence: ``docs/synthetic.md``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from dast.errors import UserError

PACKAGE = "scikit-image"
MIN_LEVEL_SIZE = 4  # the pyramid stops before a side gets shorter than this
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luminance weights


@dataclass(frozen=True)
class Swatch:
    """A crop of one of the package's sample photographs that shows a single material."""

    file: str  # file name in skimage/data
    box: tuple[int, int, int, int]  # crop (x0, y0, x1, y1) in the photograph's pixels
    colour: bool  # keep the photograph's colours; False: its luminance modulates the tint
    metres: float  # the width of the crop on a surface (its scale in the scene); 0: the sky's own mapping
    rotate: bool = False  # turn the crop by 90 degrees first (brick courses horizontal, for walls)
    contrast: float = 1.0  # scales the texture's deviations from its mean
    saturation: float = 1.0  # scales a colour swatch's deviations from its grey (luminance)


_FULL = (0, 0, 512, 512)
_WOOD = (490, 0, 600, 400)  # coffee.png: the table top right of the saucer

# The surfaces of the photographic target and the swatches each may draw from.
SWATCHES: MappingProxyType[str, tuple[Swatch, ...]] = MappingProxyType(
    {
        "road": (Swatch("gravel.png", _FULL, False, 6.0, contrast=1.2),),
        "sidewalk": (Swatch("brick.png", _FULL, False, 3.0, contrast=1.3),),
        "building": (
            Swatch("brick.png", _FULL, False, 4.0, rotate=True, contrast=1.3),
            Swatch("coffee.png", _WOOD, True, 1.5, rotate=True, saturation=0.45),
        ),
        "vegetation": (Swatch("grass.png", _FULL, False, 2.0),),
        "bark": (Swatch("coffee.png", _WOOD, False, 0.5),),
        "sky": (
            Swatch("camera.png", (280, 0, 512, 110), False, 0.0),
            Swatch("rocket.jpg", (210, 0, 295, 330), True, 0.0),
        ),
        "clothes": (
            Swatch("astronaut.png", (40, 330, 130, 500), True, 0.8),
            Swatch("camera.png", (20, 300, 130, 440), False, 0.8, contrast=0.4),
        ),
        "skin": (Swatch("astronaut.png", (185, 80, 265, 160), True, 0.25),),
        "car": (Swatch("coffee.png", (85, 170, 175, 330), False, 2.0, contrast=0.7),),
    }
)


@dataclass(frozen=True)
class Texture:
    """A swatch as a mip pyramid of H x W x 3 float32 arrays (mean luminance 1 at level 0)."""

    levels: tuple[np.ndarray, ...]
    colour: bool
    texels_per_metre: float  # at level 0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of level 0 in texels."""
        h, w = self.levels[0].shape[:2]
        return w, h


def data_dir() -> Path:
    """The ``skimage/data`` folder of the installed scikit-image (found without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the photographic demo domain needs {PACKAGE}'s sample photographs: pip install {PACKAGE}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@cache
def photo(file: str) -> np.ndarray:
    """One sample photograph as a read-only H x W x 3 uint8 RGB array (read once per process)."""
    path = data_dir() / file
    if not path.is_file():
        raise UserError(f"{path} is missing: the installed {PACKAGE} does not ship its sample photograph {file}")
    with Image.open(path) as im:
        rgb = np.array(im.convert("RGB"), np.uint8)
    rgb.setflags(write=False)
    return rgb


def _halve(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return a[:h:2, :w:2] * 0.25 + a[1:h:2, :w:2] * 0.25 + a[:h:2, 1:w:2] * 0.25 + a[1:h:2, 1:w:2] * 0.25


@cache
def texture(swatch: Swatch) -> Texture:
    """The swatch's normalised mip pyramid (built once per process)."""
    x0, y0, x1, y1 = swatch.box
    crop = photo(swatch.file)[y0:y1, x0:x1].astype(np.float32)
    if swatch.rotate:
        crop = np.ascontiguousarray(np.rot90(crop))
    luma = crop @ LUMA
    grey = np.repeat(luma[..., None], 3, axis=-1)
    crop = grey + swatch.saturation * (crop - grey) if swatch.colour else grey
    crop = crop / max(float(luma.mean()), 1.0)
    mean = crop.mean(axis=(0, 1))  # per channel: a colour swatch keeps its hue
    crop = mean + swatch.contrast * (crop - mean)
    levels = [crop.astype(np.float32)]
    while min(levels[-1].shape[:2]) >= 2 * MIN_LEVEL_SIZE:
        levels.append(_halve(levels[-1]).astype(np.float32))
    for level in levels:
        level.setflags(write=False)
    width = levels[0].shape[1]
    return Texture(tuple(levels), swatch.colour, width / swatch.metres if swatch.metres > 0 else 1.0)


def _mirror(t: np.ndarray, n: int) -> np.ndarray:
    """Integer texel indices of coordinates ``t`` on a mirrored tiling of ``n`` texels."""
    i = np.floor(t).astype(np.int64) % (2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def sample(tex: Texture, u: np.ndarray, v: np.ndarray, footprint: np.ndarray | float) -> np.ndarray:
    """The texture at level-0 texel coordinates (``u`` across, ``v`` down), each pixel read from
    the pyramid level whose texels are about ``footprint`` level-0 texels wide (nearest texel).
    The arrays broadcast together; the result has their shape plus a channel axis of 3."""
    u, v, fp = np.broadcast_arrays(np.asarray(u, np.float32), np.asarray(v, np.float32), np.float32(footprint))
    level = np.clip(np.floor(np.log2(np.maximum(fp, 1.0)) + 0.5), 0, len(tex.levels) - 1).astype(np.int64)
    lo, hi = int(level.min()), int(level.max())
    if lo == hi:  # one level (a surface facing the camera): no masks
        arr, scale = tex.levels[lo], float(2**lo)
        return arr[_mirror(v / scale, arr.shape[0]), _mirror(u / scale, arr.shape[1])]
    out = np.empty((*u.shape, 3), np.float32)
    for lv in range(lo, hi + 1):
        m = level == lv
        if m.any():
            arr, scale = tex.levels[lv], float(2**lv)
            out[m] = arr[_mirror(v[m] / scale, arr.shape[0]), _mirror(u[m] / scale, arr.shape[1])]
    return out


def shade(values: np.ndarray, tint: np.ndarray, colour: bool) -> np.ndarray:
    """Texture ``values`` (mean 1) applied to ``tint`` (RGB, broadcastable): a luminance
    texture multiplies the tint; a colour texture keeps its hue at the tint's luminance."""
    if colour:
        return values * (np.asarray(tint, np.float32) @ LUMA)[..., None]
    return values * np.asarray(tint, np.float32)


def sources() -> tuple[str, ...]:
    """Every photograph file the swatches use, sorted."""
    return tuple(sorted({s.file for group in SWATCHES.values() for s in group}))
