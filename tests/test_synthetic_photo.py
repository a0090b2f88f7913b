"""The photographic shift: target surfaces textured from scikit-image's bundled photographs,
read offline from the installed package; deterministic scenes; documented class shares."""

from __future__ import annotations

import hashlib
import importlib.util
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dast.cli import main
from dast.data import photo_textures, synthetic
from dast.data.photo_textures import SWATCHES, Swatch, Texture, data_dir, photo, sample, shade, sources, texture
from dast.data.synthetic import NUM_CLASSES, SYNTHETIC_CLASSES, generate_scene
from dast.errors import UserError

PHOTO = "photographic"
SIZE = (128, 64)

# sha256 of the photographs the swatches crop, as shipped in scikit-image 0.22 to 0.26: the
# photographic target is a function of these bytes (docs/synthetic.md names their sources).
PHOTO_SHA256 = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
}

# Pixel shares (%) of scenes 0-199 of seed 0 at 128x64, as docs/synthetic.md states them
DOCUMENTED_SHARES = {
    "road": 14.8,
    "sidewalk": 8.5,
    "building": 41.6,
    "vegetation": 10.5,
    "sky": 7.1,
    "person": 8.8,
    "car": 8.6,
}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No network for Python, scikit-image's fetcher raising, and empty texture caches (so
    everything is read again under these conditions); the caches are emptied again after."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a network connection was attempted")

    def no_fetch(*args: object, **kwargs: object) -> None:
        raise AssertionError("scikit-image's data fetcher was called")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    # scikit-image's private fetcher (where its loaders would download a file); were it to
    # move, the network block above still holds
    if importlib.util.find_spec("skimage.data._fetchers") is not None:
        monkeypatch.setattr("skimage.data._fetchers._fetch", no_fetch)
    photo.cache_clear()
    texture.cache_clear()
    yield
    photo.cache_clear()
    texture.cache_clear()


def test_photographs_load_offline_from_the_installed_package(offline: None) -> None:
    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.origin is not None
    assert data_dir() == Path(spec.origin).parent / "data"
    assert sources() == tuple(sorted(PHOTO_SHA256))
    for file in sources():
        assert (data_dir() / file).is_file()
        assert hashlib.sha256((data_dir() / file).read_bytes()).hexdigest() == PHOTO_SHA256[file], file
        img = photo(file)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and not img.flags.writeable
        assert photo(file) is img  # read once per process
    for group in SWATCHES.values():
        for swatch in group:
            assert texture(swatch) is texture(swatch)
    # a whole photographic target scene under the same conditions
    img, label = generate_scene("target", 0, 0, SIZE, PHOTO)
    assert img.shape == (64, 128, 3) and label.max() < NUM_CLASSES


def test_every_swatch_crop_lies_inside_its_photograph() -> None:
    for surface, group in SWATCHES.items():
        for s in group:
            h, w = photo(s.file).shape[:2]
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (surface, s)


def test_a_missing_package_or_photograph_is_one_readable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(photo_textures.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"^the photographic demo domain needs scikit-image's sample photographs: "):
        data_dir()
    monkeypatch.undo()
    photo.cache_clear()
    try:
        with pytest.raises(UserError, match=r"missing\.png is missing: the installed scikit-image does not ship"):
            photo("missing.png")
    finally:
        photo.cache_clear()


def test_texture_normalises_the_luminance_and_builds_a_pyramid(monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:, :8] = (50, 100, 150)  # luminance 0.299*50 + 0.587*100 + 0.114*150 = 90.75
    rgb[:, 8:] = (10, 20, 30)  # luminance 18.15
    monkeypatch.setattr(photo_textures, "photo", lambda file: rgb)
    lum = texture(Swatch("x.png", (0, 0, 16, 8), False, 2.0))
    texture.cache_clear()
    mean = (90.75 + 18.15) / 2
    assert lum.size == (16, 8) and lum.texels_per_metre == 8.0 and len(lum.levels) == 2  # 16x8, 8x4
    np.testing.assert_allclose(lum.levels[0][0, 0], [90.75 / mean] * 3, rtol=1e-5)
    np.testing.assert_allclose(lum.levels[0][0, 15], [18.15 / mean] * 3, rtol=1e-5)
    np.testing.assert_allclose(lum.levels[1][0, 3], lum.levels[0][0, 0], rtol=1e-6)  # 2x2 means
    col = texture(Swatch("x.png", (0, 0, 16, 8), True, 2.0, contrast=0.5))
    texture.cache_clear()
    # a colour swatch keeps its channels (and their means: its hue); contrast halves each
    # channel's deviations from its mean
    red = (50 + 10) / 2 / mean
    np.testing.assert_allclose(col.levels[0][0, 0, 0], red + 0.5 * (50 / mean - red), rtol=1e-5)
    np.testing.assert_allclose(col.levels[0].mean(axis=(0, 1)), np.array([60, 120, 180]) / 2 / mean, rtol=1e-5)
    rot = texture(Swatch("x.png", (0, 0, 16, 8), False, 2.0, rotate=True))
    texture.cache_clear()
    assert rot.size == (8, 16)


def _ramp_texture() -> Texture:
    level0 = np.arange(16, dtype=np.float32).reshape(4, 4)
    level1 = np.array([[2.5, 4.5], [10.5, 12.5]], np.float32)  # 2x2 means of level0
    return Texture((np.repeat(level0[..., None], 3, -1), np.repeat(level1[..., None], 3, -1)), False, 1.0)


def test_sample_tiles_by_mirroring_and_picks_the_level_of_the_footprint() -> None:
    tex = _ramp_texture()
    u = np.array([0.0, 3.9, 4.0, 7.5, 8.0, -1.0])
    # mirrored tiling of 4 texels: 0 1 2 3 3 2 1 0 | 0 1 ...; -1 is the mirror of 0
    got = sample(tex, u, np.zeros_like(u), 1.0)[:, 0]
    np.testing.assert_array_equal(got, [0, 3, 3, 0, 0, 0])
    got = sample(tex, np.array([0.0, 0.0]), np.array([1.0, 5.0]), 1.0)[:, 0]
    np.testing.assert_array_equal(got, [4, 8])  # rows 1 and 2 (mirrored)
    # footprint 2 texels: level 1 (texel (1, 1) of level 1 covers texels 2-3 of level 0)
    np.testing.assert_array_equal(sample(tex, np.array([2.0]), np.array([2.0]), 2.0)[:, 0], [12.5])
    # per-pixel footprints: 1 -> level 0, 3 -> level 1 (round(log2 3) = 2 ... clipped to 1), 64 -> level 1
    got = sample(tex, np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0]), np.array([1.0, 3.0, 64.0]))[:, 0]
    np.testing.assert_array_equal(got, [1, 2.5, 2.5])


def test_shade_luminance_and_colour_textures() -> None:
    values = np.array([[0.5, 0.5, 0.5], [2.0, 1.0, 0.5]], np.float32)
    tint = np.array([100.0, 50.0, 20.0], np.float32)
    np.testing.assert_allclose(shade(values[:1], tint, colour=False), [[50.0, 25.0, 10.0]])
    luma = 0.299 * 100 + 0.587 * 50 + 0.114 * 20  # 61.53
    np.testing.assert_allclose(shade(values[1:], tint, colour=True), [[2 * luma, luma, 0.5 * luma]], rtol=1e-5)


def test_photographic_scenes_are_deterministic_per_seed() -> None:
    def scene(index: int, seed: int) -> bytes:
        img, label = generate_scene("target", index, seed, SIZE, PHOTO)
        return img.tobytes() + label.tobytes()

    first = scene(3, 0)
    photo.cache_clear()
    texture.cache_clear()  # a fresh process reads the photographs again: the same bytes
    assert scene(3, 0) == first
    assert scene(3, 1) != first and scene(4, 0) != first
    assert (
        generate_scene("source", 3, 0, SIZE, PHOTO)[0].tobytes()
        != generate_scene("source", 3, 1, SIZE, PHOTO)[0].tobytes()
    )


@pytest.mark.parametrize("index,seed,size", [(0, 0, (128, 64)), (7, 3, (96, 48)), (42, 11, (64, 32))])
def test_photographic_shift_keeps_the_shared_layout_and_the_game_source(
    index: int, seed: int, size: tuple[int, int]
) -> None:
    src, src_label = generate_scene("source", index, seed, size, PHOTO)
    tgt, tgt_label = generate_scene("target", index, seed, size, PHOTO)
    procedural, procedural_label = generate_scene("target", index, seed, size, "appearance")
    np.testing.assert_array_equal(src_label, tgt_label)
    np.testing.assert_array_equal(tgt_label, procedural_label)  # the appearance shift's layouts
    game, _ = generate_scene("source", index, seed, size, "appearance")
    np.testing.assert_array_equal(src, game)  # the source is the appearance shift's, byte for byte
    assert np.abs(tgt.astype(int) - procedural.astype(int)).mean() > 5.0  # another target look


def test_photographic_target_surfaces_carry_the_photographs_texture() -> None:
    """Within a region, neighbouring pixels of the photographic target differ more than the
    game's (flat colours), and the road's texture changes with the photograph it comes from."""
    tgt, label = generate_scene("target", 5, 0, (256, 128), PHOTO)
    src, _ = generate_scene("source", 5, 0, (256, 128), PHOTO)
    same = label[:, 1:] == label[:, :-1]

    def detail(img: np.ndarray) -> float:
        return float(np.abs(np.diff(img.astype(float), axis=1)).mean(-1)[same].mean())

    assert detail(tgt) > 2.0 * detail(src)


def test_photographic_textures_come_from_the_photographs(monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = generate_scene("target", 2, 0, SIZE, PHOTO)
    flat = {f: np.full_like(photo(f), 128) for f in sources()}
    monkeypatch.setattr(photo_textures, "photo", lambda file: flat[file])
    texture.cache_clear()
    try:
        untextured, _ = generate_scene("target", 2, 0, SIZE, PHOTO)
    finally:
        texture.cache_clear()
    assert np.abs(base.astype(int) - untextured.astype(int)).mean() > 3.0


def test_every_class_appears_at_its_documented_share() -> None:
    counts = np.zeros(NUM_CLASSES)
    for i in range(200):
        counts += np.bincount(generate_scene("source", i, 0, SIZE, PHOTO)[1].ravel(), minlength=NUM_CLASSES)
    share = 100.0 * counts / counts.sum()
    for (name, _), got in zip(SYNTHETIC_CLASSES, share):
        assert got == pytest.approx(DOCUMENTED_SHARES[name], abs=0.06), name
    # the target's label maps are the source's (checked on a sample here; all of them above)
    for i in (0, 57, 199):
        np.testing.assert_array_equal(
            generate_scene("target", i, 0, SIZE, PHOTO)[1], generate_scene("source", i, 0, SIZE, PHOTO)[1]
        )


def test_make_data_cli_photographic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "photo"
    argv = ["make-data", "--out", str(out), "--count", "2", "--size", "48", "32", "--shift", PHOTO, "--no-progress"]
    assert main(argv) == 0
    assert "photographic shift" in capsys.readouterr().out
    for domain in ("source", "target"):
        with Image.open(out / domain / "images" / f"{domain}_00001.png") as im:
            np.testing.assert_array_equal(np.asarray(im), generate_scene(domain, 1, 0, (48, 32), PHOTO)[0])


def test_every_painted_pixel_lies_inside_its_objects_texture_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """An object's texture layer is zero outside the object's box: a part drawn beyond it
    would come out black. Before the camera effects no pixel of the target is black."""
    monkeypatch.setattr(synthetic, "_camera", lambda canvas, rng, grain=True: canvas.img)
    for size in ((128, 64), (256, 128)):
        for i in range(30):
            img, _ = generate_scene("target", i, i % 3, size, PHOTO)
            assert (img.astype(int).sum(-1) > 0).all(), (size, i)
