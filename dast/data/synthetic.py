"""Procedurally generated street scenes in two domains, for ``dast demo`` and tests.

Both domains draw the same seven classes on the same kind of street (sky, buildings
with windows, a road with a vanishing point, sidewalks, trees, people and cars), so the
classes can be learnt from shape and context in either one. They differ the way a game
engine differs from a car camera:

* ``source`` (game-like): saturated flat colours with simple per-object shading, hard
  edges, no noise.
* ``target`` (camera-like): muted, textured surfaces (asphalt grain, leaves, facades,
  clouds), cast shadows and uneven illumination, a per-image white balance and exposure,
  vignetting, lens blur and sensor noise.

Three *shifts* are available:

* ``appearance`` (the default): both domains draw their layout (horizon, vanishing
  point, street geometry, buildings, object counts, positions and sizes) from one
  shared distribution, :data:`SHARED_LAYOUT`, with a random generator that does not
  depend on the domain. Scene ``i`` of seed ``s`` therefore has the same label map in
  both domains; only the pixels differ.
* ``appearance+layout`` (the original demo domains): each domain has its own layout
  statistics as well (:data:`SOURCE_LAYOUT`: a high horizon, a wide road, few large
  objects; :data:`TARGET_LAYOUT`: a lower horizon, a narrower road, more and smaller
  objects), and one generator per domain draws everything.
* ``photographic``: the layout as under ``appearance`` (the same label maps) and the same
  game-like source, but the target's surfaces are textured with crops of real photographs
  that ship inside scikit-image (:mod:`dast.data.photo_textures`), under the same camera
  effects.

Every scene is a pure function of ``(domain, index, seed, size, shift)``. The appearance
generator is ``np.random.default_rng([seed, domain_id, index])``; under the appearance
and photographic shifts the layout generator is ``np.random.default_rng([seed, LAYOUT_STREAM, index])``.
See ``docs/synthetic.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from dast.atomic import write_text, write_with
from dast.data.photo_textures import SWATCHES, Texture, sample, shade, texture

SYNTHETIC_CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("vegetation", (107, 142, 35)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("car", (0, 0, 142)),
)
NUM_CLASSES = len(SYNTHETIC_CLASSES)
DOMAINS: tuple[str, ...] = ("source", "target")
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, PERSON, CAR = range(NUM_CLASSES)
MIN_SIZE = 16

Range = tuple[float, float]
Colour = tuple[float, float, float]


SHIFTS: tuple[str, ...] = ("appearance", "appearance+layout", "photographic")
DEFAULT_SHIFT = "appearance"  # of a synthetic dataset config and of generate_scene
# `dast demo`'s default domains: the shift closest to the paper's setting, a synthetic source
# against a photographic target, chosen on that principle before any method was run on it
# (docs/synthetic.md); `dast demo --shift appearance` gives the procedural target.
DEMO_SHIFT = PHOTOGRAPHIC = "photographic"
SHARED_LAYOUT_SHIFTS: tuple[str, ...] = ("appearance", PHOTOGRAPHIC)  # shifts whose domains share one layout
LAYOUT_STREAM = 1000  # the layout generator's key in place of the domain id (0, 1)


@dataclass(frozen=True)
class Layout:
    """Geometry statistics of a scene (lengths in metres unless noted). Everything that
    decides the label map comes from here and from the layout generator."""

    horizon: Range  # horizon row as a fraction of the height
    vanishing_x: Range  # vanishing point column as a fraction of the width
    road_half_px: Range  # road half-width at the bottom row, as a fraction of the width
    road_half_m: Range  # road half-width
    sidewalk_m: Range  # sidewalk width
    facade_height_m: Range  # building heights
    facade_gap: float  # probability that a building slot holds a low one instead
    object_scale: Range  # multiplies every object's size (camera height / focal length)
    cars: float  # mean number of cars
    persons: float  # mean number of people
    trees: float  # mean number of trees
    # base rows of the objects, as fractions of the ground below the horizon (> 1: below the image)
    car_rows: Range = (0.12, 1.15)
    person_rows: Range = (0.3, 1.1)
    tree_rows: Range = (0.1, 0.9)
    person_width_m: float = 0.55  # shoulder width of a person
    min_object_px: float = 2.0  # objects whose 1.5 m reference spans fewer pixels are not drawn
    min_object_height: float = 0.0  # ... nor those shorter than this fraction of the image height


@dataclass(frozen=True)
class Look:
    """Palette of a domain (RGB, 0..255)."""

    road: Colour
    sidewalk: Colour
    facades: tuple[Colour, ...]
    window: Colour
    vegetation: Colour
    sky_top: Colour
    sky_horizon: Colour
    car_paints: tuple[Colour, ...]
    clothes: tuple[Colour, ...]
    colour_jitter: float  # std of the per-object colour jitter (0..255 units)


SOURCE_LAYOUT = Layout(
    horizon=(0.40, 0.50),
    vanishing_x=(0.40, 0.60),
    road_half_px=(0.40, 0.55),
    road_half_m=(6.0, 8.0),
    sidewalk_m=(2.5, 4.0),
    facade_height_m=(6.0, 14.0),
    facade_gap=0.25,
    object_scale=(1.0, 1.25),
    cars=2.5,
    persons=1.5,
    trees=1.5,
)

TARGET_LAYOUT = Layout(
    horizon=(0.32, 0.42),
    vanishing_x=(0.35, 0.65),
    road_half_px=(0.28, 0.42),
    road_half_m=(4.0, 6.0),
    sidewalk_m=(2.0, 4.0),
    facade_height_m=(7.0, 16.0),
    facade_gap=0.12,
    object_scale=(0.75, 1.0),
    cars=4.0,
    persons=3.0,
    trees=3.5,
)

# The layout both domains share under the appearance shift: a narrow shopping street seen
# from close by, with many people near the camera. People and cars are drawn large (and
# people bulky) so that every class can be learnt at the demo's 128x64 resolution within
# its training budget; objects too small to make out are left out. See docs/synthetic.md.
SHARED_LAYOUT = Layout(
    horizon=(0.34, 0.46),
    vanishing_x=(0.38, 0.62),
    road_half_px=(0.32, 0.46),
    road_half_m=(3.5, 5.0),
    sidewalk_m=(2.0, 3.5),
    facade_height_m=(6.0, 15.0),
    facade_gap=0.2,
    object_scale=(1.2, 1.4),
    cars=3.0,
    persons=8.0,
    trees=2.5,
    car_rows=(0.25, 1.15),
    person_rows=(0.7, 1.15),
    tree_rows=(0.1, 0.9),
    person_width_m=1.0,
    min_object_height=0.15,
)

SOURCE_LOOK = Look(
    road=(72, 72, 80),
    sidewalk=(190, 175, 160),
    facades=((196, 120, 80), (214, 196, 150), (120, 140, 186), (168, 92, 96), (150, 170, 120)),
    window=(80, 120, 165),
    vegetation=(60, 160, 50),
    sky_top=(80, 150, 240),
    sky_horizon=(160, 205, 250),
    car_paints=((210, 30, 30), (30, 60, 200), (235, 200, 30), (240, 240, 240), (30, 30, 30), (160, 162, 170)),
    clothes=((220, 60, 60), (60, 80, 220), (240, 200, 60), (60, 170, 80), (240, 240, 240)),
    colour_jitter=10.0,
)

TARGET_LOOK = Look(
    road=(98, 96, 102),
    sidewalk=(160, 155, 148),
    facades=((150, 130, 115), (170, 160, 140), (120, 120, 125), (140, 110, 95), (185, 180, 170)),
    window=(60, 66, 72),
    vegetation=(80, 110, 50),
    sky_top=(120, 160, 215),
    sky_horizon=(185, 205, 225),
    car_paints=((48, 48, 52), (180, 180, 184), (230, 230, 228), (40, 52, 84), (120, 40, 40), (96, 100, 104)),
    clothes=((40, 40, 48), (70, 70, 90), (110, 96, 80), (150, 150, 150), (90, 40, 40)),
    colour_jitter=9.0,
)

_DOMAIN_LAYOUTS = {"source": SOURCE_LAYOUT, "target": TARGET_LAYOUT}
_LOOKS = {"source": SOURCE_LOOK, "target": TARGET_LOOK}
# Per-class texture strength of the target domain (0..255 units of zero-mean noise).
_TEXTURE = np.array([8.0, 6.0, 7.0, 22.0, 2.0, 6.0, 6.0], np.float32)


def domain_id(domain: str) -> int:
    """0 for ``source``, 1 for ``target``; anything else is a ``ValueError``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return DOMAINS.index(domain)


class _Canvas:
    """An RGB float image and its label map, painted back to front."""

    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.img = np.zeros((h, w, 3), np.float32)
        self.label = np.zeros((h, w), np.uint8)
        self.ys = np.arange(h, dtype=np.float32)[:, None]
        self.xs = np.arange(w, dtype=np.float32)[None, :]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice] | None:
        """Integer slices of the pixels whose centres lie in [x0, x1) x [y0, y1), or None."""
        c0, c1 = max(0, math.ceil(x0 - 0.5)), min(self.w, math.ceil(x1 - 0.5))
        r0, r1 = max(0, math.ceil(y0 - 0.5)), min(self.h, math.ceil(y1 - 0.5))
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def paint(self, sl: tuple[slice, slice], mask: np.ndarray | None, cls: int | None, colour: np.ndarray) -> None:
        """Set the pixels of ``mask`` (within ``sl``) to ``colour`` (3 or bbox x 3) and ``cls``."""
        img = self.img[sl]
        if mask is None:
            img[...] = colour
            if cls is not None:
                self.label[sl] = cls
            return
        img[mask] = np.broadcast_to(colour, (*mask.shape, 3))[mask] if colour.ndim == 3 else colour
        if cls is not None:
            self.label[sl][mask] = cls

    def rect(
        self, x0: float, y0: float, x1: float, y1: float, cls: int | None, colour: np.ndarray, shade: float = 0.0
    ) -> None:
        sl = self.box(x0, y0, x1, y1)
        if sl is not None:
            self.paint(sl, None, cls, _fill(colour, sl, self.ys[sl[0]], y0, y1, shade))

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float, cls: int | None, colour: np.ndarray, shade: float = 0.0
    ) -> None:
        sl = self.box(cx - rx, cy - ry, cx + rx, cy + ry)
        if sl is None:
            return
        ys, xs = self.ys[sl[0]], self.xs[:, sl[1]]
        mask = ((xs + 0.5 - cx) / max(rx, 0.5)) ** 2 + ((ys + 0.5 - cy) / max(ry, 0.5)) ** 2 <= 1.0
        self.paint(sl, mask, cls, _fill(colour, sl, ys, cy - ry, cy + ry, shade))


def _fill(
    colour: np.ndarray, sl: tuple[slice, slice], ys: np.ndarray, y0: float, y1: float, shade: float
) -> np.ndarray:
    """What a shape paints over ``sl``: an RGB ``colour`` (with its shading ramp), or the
    slice of a full-canvas H x W x 3 colour layer (a photographic texture)."""
    if colour.ndim == 3:
        return colour[sl]
    return _shaded(colour, ys, y0, y1, shade)


def _shaded(colour: np.ndarray, ys: np.ndarray, y0: float, y1: float, shade: float) -> np.ndarray:
    """A vertical light-to-dark ramp over [y0, y1) (``shade`` = relative amplitude)."""
    if shade == 0.0:
        return colour
    t = np.clip((ys + 0.5 - y0) / max(y1 - y0, 1.0), 0.0, 1.0)  # rows x 1
    return colour[None, None, :] * (1.0 + shade * (0.5 - t))[..., None]


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _pick(rng: np.random.Generator, options: tuple[Colour, ...], jitter: float) -> np.ndarray:
    base = np.asarray(options[int(rng.integers(len(options)))], np.float32)
    return base + rng.normal(0.0, jitter, 3).astype(np.float32)


def _jitter(rng: np.random.Generator, colour: Colour, jitter: float) -> np.ndarray:
    return np.asarray(colour, np.float32) + rng.normal(0.0, jitter, 3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: tuple[int, int]) -> np.ndarray:
    """Zero-mean, roughly unit-std low-frequency noise (bicubic upsampling of a coarse grid)."""
    grid = rng.standard_normal((cells[1], cells[0])).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC), np.float32)


@dataclass(frozen=True)
class _Street:
    """The ground-plane geometry of one scene (pixels)."""

    horizon: float  # row of the horizon
    vx: float  # column of the vanishing point
    px_per_m_row: float  # pixels per metre, per row below the horizon
    road_half_m: float
    sidewalk_m: float

    def ppm(self, y: float | np.ndarray) -> np.ndarray:
        """Pixels per metre on the ground at row ``y`` (0 at the horizon)."""
        return np.maximum(np.asarray(y, np.float32) - self.horizon, 0.0) * self.px_per_m_row


@dataclass
class _Painter:
    """What every drawing step needs: the canvas, the statistics and the two generators.

    ``geo`` draws the layout (everything the label map depends on) and ``ink`` the
    appearance. Under the ``appearance+layout`` shift they are the same generator, so the
    draws interleave exactly as they always have.
    """

    canvas: _Canvas
    layout: Layout
    look: Look
    camera: bool  # the camera-like target domain
    geo: np.random.Generator
    ink: np.random.Generator
    photo: bool = False  # the target of the photographic shift: surfaces textured from photographs


def _swatch(p: _Painter, surface: str) -> Texture:
    """One of the surface's photographic textures, chosen by the appearance generator."""
    options = SWATCHES[surface]
    return texture(options[int(p.ink.integers(len(options)))])


def _photo(
    p: _Painter, surface: str, u: np.ndarray, v: np.ndarray, m_per_px: np.ndarray, tint: np.ndarray
) -> np.ndarray:
    """``tint`` textured with a photograph of the surface, at surface coordinates in metres
    (``u`` across, ``v`` down; ``m_per_px`` metres per pixel), from a random place of the photo."""
    tex = _swatch(p, surface)
    w, h = tex.size
    u0, v0 = float(p.ink.uniform(0.0, 2.0 * w)), float(p.ink.uniform(0.0, 2.0 * h))
    tpm = tex.texels_per_metre
    return shade(sample(tex, u0 + u * tpm, v0 + v * tpm, m_per_px * tpm), tint, tex.colour)


def _object_layer(
    p: _Painter, surface: str, box: tuple[float, float, float, float], ppm: float, tint: np.ndarray
) -> np.ndarray:
    """A full-canvas colour layer: ``tint`` textured over ``box`` (x0, y0, x1, y1, padded by a
    pixel) as a surface facing the camera at ``ppm`` pixels per metre; zero elsewhere."""
    c = p.canvas
    layer = np.zeros((c.h, c.w, 3), np.float32)
    x0, y0, x1, y1 = box
    sl = c.box(x0 - 1.0, y0 - 1.0, x1 + 1.0, y1 + 1.0)
    if sl is not None:
        ppm = max(ppm, 1e-3)
        u = (c.xs[:, sl[1]] + 0.5 - x0) / ppm
        v = (c.ys[sl[0]] + 0.5 - y0) / ppm
        layer[sl] = _photo(p, surface, u, v, np.float32(1.0 / ppm), tint)
    return layer


def _street(p: _Painter) -> _Street:
    lay, geo, h, w = p.layout, p.geo, p.canvas.h, p.canvas.w
    horizon = h * _uniform(geo, lay.horizon)
    vx = w * _uniform(geo, lay.vanishing_x)
    road_half_m = _uniform(geo, lay.road_half_m)
    half_px = w * _uniform(geo, lay.road_half_px)
    return _Street(horizon, vx, half_px / road_half_m / (h - horizon), road_half_m, _uniform(geo, lay.sidewalk_m))


def _draw_sky(p: _Painter, st: _Street) -> None:
    c, look = p.canvas, p.look
    t = np.clip(c.ys / max(st.horizon, 1.0), 0.0, 1.0)[..., None]  # rows x 1 x 1
    top, bottom = _jitter(p.ink, look.sky_top, 8.0), _jitter(p.ink, look.sky_horizon, 6.0)
    sky = top * (1.0 - t) + bottom * t
    if p.photo:  # a photographed sky stretched over the rows above the horizon
        tex = _swatch(p, "sky")
        tw, th = tex.size
        span = float(p.ink.uniform(0.6, 1.0)) * tw  # texels across the image
        u = float(p.ink.uniform(0.0, tw - span)) + (c.xs + 0.5) * (span / c.w)
        rows = max(st.horizon, 1.0)
        v = np.minimum((c.ys + 0.5) / rows, 1.0) * (th - 1)
        c.img[:] = shade(sample(tex, u, v, max(span / c.w, th / rows)), sky, tex.colour)
        c.label[:] = SKY
        return
    sky = np.broadcast_to(sky, (c.h, c.w, 3)).copy()
    if p.camera:  # clouds
        clouds = np.clip(_smooth_noise(p.ink, c.w, c.h, (6, 3)) * 0.8, -1.0, 1.0)
        sky += 22.0 * clouds[..., None]
    c.img[:] = sky
    c.label[:] = SKY


def _draw_buildings(p: _Painter, st: _Street) -> None:
    """Facades along both sides of the street: roof lines converge to the vanishing point.

    A facade at lateral distance ``setback`` stands on the ground row where
    ``|x - vx| = setback * ppm``; its roof is ``height * ppm`` pixels above the horizon.
    """
    c, lay, look, geo, ink = p.canvas, p.layout, p.look, p.geo, p.ink
    setback_m = st.road_half_m + st.sidewalk_m
    dist = np.maximum(np.abs(c.xs[0] + 0.5 - st.vx), 0.05 * c.w)  # the street's far end keeps some height
    ppm_base = dist / setback_m  # pixels per metre at each column's facade base
    base_rows = st.horizon + ppm_base / st.px_per_m_row
    sx, sy = max(3.0, c.w / 40.0), max(3.0, c.h / 18.0)  # window grid spacing (pixels)
    x = 0.0
    while x < c.w:
        x0 = x
        x = min(float(c.w), x + c.w * float(geo.uniform(0.07, 0.22)))
        sl = c.box(x0, 0.0, x, float(c.h))
        if sl is None:
            continue
        height_m = _uniform(geo, lay.facade_height_m)
        if geo.random() < lay.facade_gap:  # a gap in the row: a low building further back
            height_m *= 0.3
        tops = (st.horizon - height_m * ppm_base[sl[1]])[None, :]
        ys = c.ys[sl[0]]
        mask = ys + 0.5 >= tops
        colour = _pick(ink, look.facades, look.colour_jitter)
        top = float(max(tops.min(), 0.0))
        fill = colour if p.camera else _shaded(colour, ys, top, float(c.h), 0.2)
        if p.photo:  # the wall of a street seen by a pinhole with a focal length of w pixels
            base = ppm_base[sl[1]][None, :]
            u, v = c.w / base, (ys + 0.5 - st.horizon) / base  # metres along the street, below the horizon
            fill = _photo(p, "building", u, v, np.maximum(1.0 / base, c.w / (setback_m * base**2)), colour)
        c.paint(sl, mask, BUILDING, fill)
        # windows: a regular grid between the roof and the ground floor
        fx = (c.xs[:, sl[1]] - x0) / sx + float(ink.uniform(0, 1))
        fy = ys / sy + float(ink.uniform(0, 1))
        floor = base_rows[sl[1]][None, :] - 2.5 * ppm_base[sl[1]][None, :]
        win = mask & (fx % 1.0 < 0.55) & (fy % 1.0 < 0.5) & (ys + 0.5 >= tops + 0.6 * sy) & (ys + 0.5 < floor)
        if not win.any():
            continue
        wcol = _jitter(ink, look.window, 6.0)
        if p.camera:  # each pane reflects a little differently
            grid = ink.normal(0.0, 16.0, (int(c.h / sy) + 3, int(c.w / sx) + 3)).astype(np.float32)
            iy = np.clip(fy.astype(np.int64), 0, grid.shape[0] - 1)
            ix = np.clip(fx.astype(np.int64), 0, grid.shape[1] - 1)
            c.paint(sl, win, None, wcol[None, None, :] + grid[iy, ix][..., None])
        else:
            c.paint(sl, win, None, wcol)


def _draw_ground(p: _Painter, st: _Street) -> None:
    """Sidewalks, then the road over them, then a dashed centre line."""
    c, look, ink = p.canvas, p.look, p.ink
    r0 = max(0, math.ceil(st.horizon - 0.5))
    if r0 >= c.h:
        return
    rows = slice(r0, c.h)
    ys = c.ys[rows] + 0.5
    ppm = st.ppm(ys)
    dx = c.xs + 0.5 - st.vx
    outer = np.abs(dx) <= (st.road_half_m + st.sidewalk_m) * ppm
    road = np.abs(dx) <= st.road_half_m * ppm
    sidewalk_col = _jitter(ink, look.sidewalk, look.colour_jitter)
    road_col = _jitter(ink, look.road, look.colour_jitter * 0.5)
    shade = 0.0 if p.camera else -0.25  # the game darkens the ground towards the horizon
    side_fill = _shaded(sidewalk_col, ys - 0.5, st.horizon, c.h, shade)
    road_fill = _shaded(road_col, ys - 0.5, st.horizon, c.h, shade)
    kerb_fill = sidewalk_col * 0.75
    if p.photo:  # the ground plane in perspective (pinhole, focal length w pixels)
        near = np.maximum(ppm, 1e-3)
        u, v = dx / near, c.w / near  # metres across and along the street
        m_per_px = np.maximum(1.0 / near, c.w * st.px_per_m_row / near**2)
        side_fill = _photo(p, "sidewalk", u, v, m_per_px, sidewalk_col)
        road_fill = _photo(p, "road", u, v, m_per_px, road_col)
        kerb_fill = side_fill * 0.75
    c.paint((rows, slice(None)), outer, SIDEWALK, side_fill)
    c.paint((rows, slice(None)), road, ROAD, road_fill)
    # kerb: a thin darker band at the road edge
    kerb = outer & ~road & (np.abs(dx) <= (st.road_half_m + 0.25) * ppm)
    c.paint((rows, slice(None)), kerb, None, kerb_fill)
    # dashed centre line: dashes of equal ground length (period in 1 / depth)
    depth = 1.0 / np.maximum(ys - st.horizon, 0.5)
    dash = ((depth * (c.h * 2.0) + float(ink.uniform(0, 1))) % 1.0 < 0.5) & (np.abs(dx) <= 0.12 * ppm + 0.2)
    line = np.asarray((235, 235, 225) if not p.camera else (175, 172, 160), np.float32)
    c.paint((rows, slice(None)), dash & road, None, line)


def _draw_car(p: _Painter, x: float, y: float, ppm: float) -> None:
    c, look, camera = p.canvas, p.look, p.camera
    w, h = 1.8 * ppm * float(p.geo.uniform(0.9, 1.15)), 1.5 * ppm * float(p.geo.uniform(0.9, 1.1))
    paint = _pick(p.ink, look.car_paints, look.colour_jitter)
    if p.photo:
        paint = _object_layer(p, "car", (x - w / 2, y - h, x + w / 2, y), ppm, paint)
    glass = np.asarray((40, 50, 70) if camera else (90, 150, 210), np.float32)
    dark = np.asarray((20, 20, 22), np.float32)
    shade = 0.0 if camera else 0.4
    body_top = y - 0.6 * h
    c.rect(x - w / 2, body_top, x + w / 2, y - 0.12 * h, CAR, paint, shade)
    c.rect(x - 0.36 * w, y - h, x + 0.36 * w, body_top + 0.5, CAR, paint * 0.92, shade)
    c.rect(x - 0.3 * w, y - 0.92 * h, x + 0.3 * w, body_top, CAR, glass)
    for side in (-1.0, 1.0):
        c.rect(x + side * 0.34 * w - 0.11 * w, y - 0.2 * h, x + side * 0.34 * w + 0.11 * w, y, CAR, dark)
    lamp = np.asarray((250, 240, 200) if not camera else (200, 190, 170), np.float32)
    for side in (-1.0, 1.0):
        c.rect(x + side * 0.4 * w - 0.06 * w, y - 0.5 * h, x + side * 0.4 * w + 0.06 * w, y - 0.4 * h, CAR, lamp)


def _draw_person(p: _Painter, x: float, y: float, ppm: float) -> None:
    c, look, camera = p.canvas, p.look, p.camera
    h = 1.8 * ppm * float(p.geo.uniform(0.9, 1.1))
    w = p.layout.person_width_m * ppm * float(p.geo.uniform(0.85, 1.15))
    top_col = _pick(p.ink, look.clothes, look.colour_jitter)
    legs_col = _pick(p.ink, look.clothes, look.colour_jitter) * 0.7
    skin = _jitter(p.ink, (224, 172, 140) if not camera else (176, 140, 120), 12.0)
    if p.photo:
        box = (x - w / 2, y - h, x + w / 2, y)
        top_col = _object_layer(p, "clothes", box, ppm, top_col)
        legs_col = _object_layer(p, "clothes", box, ppm, legs_col)
        skin = _object_layer(p, "skin", box, ppm, skin)
    shade = 0.0 if camera else 0.3
    c.rect(x - 0.38 * w, y - 0.47 * h, x - 0.04 * w, y, PERSON, legs_col)
    c.rect(x + 0.04 * w, y - 0.47 * h, x + 0.38 * w, y, PERSON, legs_col)
    c.ellipse(x, y - 0.64 * h, w / 2, 0.2 * h, PERSON, top_col, shade)
    c.ellipse(x, y - 0.91 * h, 0.22 * w + 0.3, 0.09 * h + 0.3, PERSON, skin)


def _draw_tree(p: _Painter, x: float, y: float, ppm: float) -> None:
    c, geo, camera = p.canvas, p.geo, p.camera
    trunk_h = float(geo.uniform(2.0, 3.2)) * ppm
    radius = float(geo.uniform(1.4, 2.4)) * ppm
    trunk = np.asarray((110, 80, 50) if not camera else (70, 62, 54), np.float32)
    leaves = _jitter(p.ink, p.look.vegetation, p.look.colour_jitter)
    cy = y - trunk_h - radius * 0.8
    if p.photo:  # the crown's box holds its two lumps too
        trunk = _object_layer(
            p, "bark", (x - 0.15 * ppm - 0.3, y - trunk_h - radius * 0.5, x + 0.15 * ppm + 0.3, y), ppm, trunk
        )
        crown = (x - 1.35 * radius, cy - 1.25 * radius, x + 1.35 * radius, cy + 1.05 * radius)
        leaves = _object_layer(p, "vegetation", crown, ppm, leaves)
    c.rect(x - 0.15 * ppm - 0.3, y - trunk_h - radius * 0.5, x + 0.15 * ppm + 0.3, y, VEGETATION, trunk)
    shade = 0.0 if camera else 0.35
    c.ellipse(x, cy, radius, radius * 1.05, VEGETATION, leaves, shade)
    for _ in range(2):  # a lumpy crown
        ox, oy = geo.uniform(-0.6, 0.6) * radius, geo.uniform(-0.5, 0.3) * radius
        c.ellipse(
            x + ox, cy + oy, radius * 0.7, radius * 0.7, VEGETATION, leaves * float(p.ink.uniform(0.9, 1.05)), shade
        )


def _draw_objects(p: _Painter, st: _Street) -> None:
    """Cars on the road, people on the sidewalks (a few crossing), trees along the kerb;
    painted far to near. Objects too small to make out are skipped."""
    c, lay, geo = p.canvas, p.layout, p.geo
    scale = _uniform(geo, lay.object_scale)
    objects: list[tuple[float, int, float]] = []  # (row of the base, kind, lateral position in metres)
    span = c.h - st.horizon
    for _ in range(int(geo.poisson(lay.cars))):
        y = st.horizon + span * _uniform(geo, lay.car_rows)
        lateral = float(geo.uniform(-1.0, 1.0)) * max(st.road_half_m - 1.0, 0.5)
        objects.append((y, CAR, lateral))
    for _ in range(int(geo.poisson(lay.persons))):
        y = st.horizon + span * _uniform(geo, lay.person_rows)
        side = 1.0 if geo.random() < 0.5 else -1.0
        if geo.random() < 0.15:
            lateral = float(geo.uniform(-1.0, 1.0)) * st.road_half_m
        else:
            lateral = side * (st.road_half_m + float(geo.uniform(0.3, 0.9)) * st.sidewalk_m)
        objects.append((y, PERSON, lateral))
    for _ in range(int(geo.poisson(lay.trees))):
        y = st.horizon + span * _uniform(geo, lay.tree_rows)
        side = 1.0 if geo.random() < 0.5 else -1.0
        objects.append((y, VEGETATION, side * (st.road_half_m + float(geo.uniform(0.55, 0.9)) * st.sidewalk_m)))
    objects.sort(key=lambda o: o[0])
    draw = {CAR: _draw_car, PERSON: _draw_person, VEGETATION: _draw_tree}
    for y, kind, lateral in objects:
        ppm = float(st.ppm(y))
        reference = ppm * scale * 1.5  # pixels spanned by 1.5 m at the object's base
        if reference < lay.min_object_px or reference < lay.min_object_height * c.h:
            continue
        x = st.vx + lateral * ppm
        draw[kind](p, x, y, ppm * scale)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an H x W x 3 float image (edge padding)."""
    r = max(1, int(math.ceil(2.0 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float32) / sigma) ** 2)
    k /= k.sum()
    h, w = img.shape[:2]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    out = sum(k[i] * p[i : i + h] for i in range(2 * r + 1))
    p = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * p[:, i : i + w] for i in range(2 * r + 1))


def _texture(img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> None:
    """Surface texture: fine grain plus blotches, with a strength per class (in place)."""
    h, w = label.shape
    grain = rng.standard_normal((h, w)).astype(np.float32)
    blotch = _smooth_noise(rng, w, h, (max(2, w // 6), max(2, h // 6)))
    img += (_TEXTURE[label] * (0.6 * grain + 0.6 * blotch))[..., None]


def _lighting(img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> None:
    """Cast shadows below the sky, exposure, white balance and vignetting (in place)."""
    h, w = label.shape
    light = 1.0 + 0.18 * np.clip(_smooth_noise(rng, w, h, (5, 3)), -1.5, 1.5)
    img *= np.where(label == SKY, 1.0, light).astype(np.float32)[..., None]
    img *= np.exp(rng.normal(0.0, 0.04, 3)).astype(np.float32) * float(rng.uniform(0.85, 1.15))
    ys = (np.arange(h, dtype=np.float32)[:, None] + 0.5 - h / 2) / (h / 2)
    xs = (np.arange(w, dtype=np.float32)[None, :] + 0.5 - w / 2) / (w / 2)
    img *= (1.0 - 0.06 * (xs**2 + ys**2))[..., None]


def _optics(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma and lens blur (the blur radius scales with the image width)."""
    img = 255.0 * (np.clip(img, 0.0, 255.0) / 255.0) ** float(rng.uniform(0.9, 1.15))
    return _blur(img, float(rng.uniform(0.5, 0.9)) * max(img.shape[1] / 128.0, 0.5))


def _sensor(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signal-dependent shot noise plus read noise."""
    shot = np.sqrt(np.maximum(img, 0.0)) * float(rng.uniform(0.3, 0.6))
    return img + rng.standard_normal(img.shape).astype(np.float32) * (shot + float(rng.uniform(2.0, 5.0)))


def _camera(c: _Canvas, rng: np.random.Generator, grain: bool = True) -> np.ndarray:
    """Turn the painted target scene into a photograph: texture (``grain``: the procedural one;
    photographic surfaces bring their own), light, optics, sensor."""
    if grain:
        _texture(c.img, c.label, rng)
    _lighting(c.img, c.label, rng)
    return _sensor(_optics(c.img, rng), rng)


def check_shift(shift: str) -> str:
    """``shift`` if it names a shift of :data:`SHIFTS`; otherwise a ``ValueError``."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown domain shift {shift!r}; choose one of {', '.join(SHIFTS)}")
    return shift


def generate_scene(
    domain: str, index: int, seed: int, size: tuple[int, int], shift: str = DEFAULT_SHIFT
) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (H x W x 3 uint8 RGB image, H x W uint8 trainId label).

    ``size`` is (width, height), each at least 16. Label values index
    :data:`SYNTHETIC_CLASSES`. The result depends only on the arguments. Under the
    ``appearance`` and ``photographic`` shifts the label map does not depend on ``domain``
    (nor on which of the two shifts it is), and the photographic shift's source scenes are
    the appearance shift's.
    """
    did = domain_id(domain)
    check_shift(shift)
    w, h = int(size[0]), int(size[1])
    if w < MIN_SIZE or h < MIN_SIZE:
        raise ValueError(f"synthetic scenes need a size of at least {MIN_SIZE}x{MIN_SIZE}, got {w}x{h}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
    ink = np.random.default_rng([int(seed), did, int(index)])
    if shift in SHARED_LAYOUT_SHIFTS:
        geo, layout = np.random.default_rng([int(seed), LAYOUT_STREAM, int(index)]), SHARED_LAYOUT
    else:
        geo, layout = ink, _DOMAIN_LAYOUTS[domain]
    photo = shift == PHOTOGRAPHIC and domain == "target"
    p = _Painter(_Canvas(w, h), layout, _LOOKS[domain], domain == "target", geo, ink, photo)
    st = _street(p)
    _draw_sky(p, st)
    _draw_buildings(p, st)
    _draw_ground(p, st)
    _draw_objects(p, st)
    img = _camera(p.canvas, ink, grain=not photo) if p.camera else p.canvas.img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), p.canvas.label


def classes_yaml() -> str:
    """The ``classes.yaml`` text of a folder dataset: a list of {name, color}."""
    entries = [{"name": name, "color": list(colour)} for name, colour in SYNTHETIC_CLASSES]
    return yaml.safe_dump(entries, sort_keys=False, default_flow_style=None)


def scene_stem(domain: str, index: int) -> str:
    """File stem of scene ``index`` of ``domain``: ``source_00012``."""
    return f"{domain}_{index:05d}"


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG")


def write_folder_dataset(
    root: str | Path,
    domain: str,
    count: int,
    seed: int,
    size: tuple[int, int],
    progress: bool = True,
    fsync: bool = True,
    shift: str = DEFAULT_SHIFT,
) -> Path:
    """Write ``count`` scenes as a ``folder`` dataset under ``root`` and return ``root``.

    Layout: ``images/<stem>.png`` (RGB), ``labels/<stem>.png`` (single-channel class
    indices) and ``classes.yaml``. Every file is written atomically. ``shift`` is passed
    to :func:`generate_scene`.
    """
    domain_id(domain)
    check_shift(shift)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out = Path(root)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    write_text(out / "classes.yaml", classes_yaml(), fsync=fsync)
    indices: Iterable[int] = range(count)
    if progress:
        indices = tqdm(range(count), desc=f"{domain} scenes", unit="img")
    for i in indices:
        img, label = generate_scene(domain, i, seed, size, shift)
        stem = scene_stem(domain, i)
        write_with(out / "images" / f"{stem}.png", partial(_save_png, img), fsync=fsync)
        write_with(out / "labels" / f"{stem}.png", partial(_save_png, label), fsync=fsync)
    return out
