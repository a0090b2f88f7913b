"""Photometric augmentation: each operation on hand-made images, seeding, labels untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dast.config import AugmentConfig, ClassSpec, DatasetConfig, load_config
from dast.data.datasets import augment_pair, build_dataset, photometric_augment
from dast.data.transforms import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    jitter_factor,
    to_grayscale,
)
from dast.errors import ConfigError

PHOTOMETRIC = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, blur_prob=0.5, grayscale_prob=0.3)


def _px(*rgb: tuple[int, int, int]) -> np.ndarray:
    return np.array([rgb], np.uint8)


def test_brightness_contrast_and_saturation_match_hand_computed_values():
    img = _px((10, 101, 200))
    # 13.0, 131.3 -> 131, 260 -> clipped to 255
    assert adjust_brightness(img, 1.3).tolist() == [[[13, 131, 255]]]
    assert adjust_brightness(img, 0.0).tolist() == [[[0, 0, 0]]]
    assert np.array_equal(adjust_brightness(img, 1.0), img)
    # mean grey of black and white is 127.5: 0.5 * 0 + 0.5 * 127.5 = 63.75, 0.5 * 255 + 63.75 = 191.25
    bw = _px((0, 0, 0), (255, 255, 255))
    assert adjust_contrast(bw, 0.5).tolist() == [[[64, 64, 64], [191, 191, 191]]]
    assert np.array_equal(adjust_contrast(bw, 1.0), bw)
    # luma of (200, 100, 50) = 59.8 + 58.7 + 5.7 = 124.2; factor 2: 2 * c - 124.2
    warm = _px((200, 100, 50))
    assert adjust_saturation(warm, 2.0).tolist() == [[[255, 76, 0]]]
    assert adjust_saturation(warm, 0.0).tolist() == [[[124, 124, 124]]]
    assert np.array_equal(adjust_saturation(warm, 1.0), warm)


def test_grayscale_has_equal_channels_holding_the_luma():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = to_grayscale(img)
    assert grey.shape == img.shape and grey.dtype == np.uint8
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
    assert to_grayscale(_px((200, 100, 50))).tolist() == [[[124, 124, 124]]]
    expect = np.rint(img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114)
    assert np.array_equal(grey[..., 0], expect.astype(np.uint8))
    # PIL's integer luma rounds within one grey level of ours
    pil = np.asarray(Image.fromarray(img).convert("L")).astype(int)
    assert np.abs(pil - grey[..., 0].astype(int)).max() <= 1


def test_hue_shift_of_pure_colours():
    red = _px((255, 0, 0))
    assert adjust_hue(red, 1 / 3).tolist() == [[[0, 255, 0]]]
    assert adjust_hue(red, -1 / 3).tolist() == [[[0, 0, 255]]]
    assert adjust_hue(red, 1 / 6).tolist() == [[[255, 255, 0]]]
    assert adjust_hue(red, 0.5).tolist() == [[[0, 255, 255]]]
    # grey has no hue; any image comes back unchanged at shift 0 and after a full turn
    assert adjust_hue(_px((90, 90, 90)), 0.37).tolist() == [[[90, 90, 90]]]
    img = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    assert np.array_equal(adjust_hue(img, 0.0), img)
    assert np.abs(adjust_hue(adjust_hue(img, 0.25), -0.25).astype(int) - img).max() <= 1


def test_gaussian_blur():
    img = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    assert np.array_equal(gaussian_blur(img, 0.0), img)
    flat = np.full((8, 8, 3), (37, 120, 250), np.uint8)
    assert np.array_equal(gaussian_blur(flat, 1.7), flat)  # a constant image keeps its value (and mean)
    blurred = gaussian_blur(img, 1.0)
    assert blurred.shape == img.shape and blurred.std() < img.std()
    # an impulse: the centre keeps 255 * g(0)^2 with g the normalised 7-tap kernel of sigma 1
    impulse = np.zeros((21, 21, 3), np.uint8)
    impulse[10, 10] = 255
    taps = np.exp(-(np.arange(-3, 4) ** 2) / 2.0)
    centre = 255 * (taps[3] / taps.sum()) ** 2  # 40.6
    out = gaussian_blur(impulse, 1.0)
    assert abs(int(out[10, 10, 0]) - centre) <= 1
    assert np.array_equal(out, out[::-1, ::-1])  # symmetric


def test_jitter_factor_range():
    rng = np.random.default_rng(3)
    small = [jitter_factor(rng, 0.2) for _ in range(200)]
    assert 0.8 <= min(small) and max(small) <= 1.2
    big = [jitter_factor(rng, 1.5) for _ in range(200)]
    assert 0.0 <= min(big) < 0.5 and 2.0 < max(big) <= 2.5


def test_all_off_draws_nothing_and_changes_nothing():
    img = np.random.default_rng(4).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    rng = np.random.default_rng(9)
    assert photometric_augment(img, AugmentConfig(), rng) is img
    assert rng.random() == np.random.default_rng(9).random()  # the generator was not advanced
    # geometric augmentation alone gives the same pixels and the same label with or without the
    # (off) photometric settings written out
    label = np.arange(48, dtype=np.uint8).reshape(6, 8)
    geo = AugmentConfig(flip=True, crop=(5, 4))
    written = AugmentConfig(flip=True, crop=(5, 4), **dict.fromkeys(PHOTOMETRIC, 0.0))
    a = augment_pair(img, label, geo, np.random.default_rng(5))
    b = augment_pair(img, label, written, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # switching photometric ops on keeps the geometric draws (they come first): same label
    c = augment_pair(img, label, AugmentConfig(flip=True, crop=(5, 4), **PHOTOMETRIC), np.random.default_rng(5))
    assert np.array_equal(a[1], c[1])


def _folder(root: Path, n: int = 3) -> DatasetConfig:
    rng = np.random.default_rng(6)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (10, 16, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
        Image.fromarray(rng.integers(0, 3, (10, 16), dtype=np.uint8)).save(root / "labels" / f"{k}.png")
    return DatasetConfig(kind="folder", root=str(root), classes=[ClassSpec(name=c) for c in "abc"])


def test_dataset_augments_images_only_deterministically(tmp_path):
    cfg = _folder(tmp_path / "ds")
    plain = build_dataset(cfg, norm="unit", num_classes=3, seed=1)
    off = build_dataset(
        cfg.model_copy(update={"augment": AugmentConfig(**dict.fromkeys(PHOTOMETRIC, 0.0))}),
        norm="unit",
        num_classes=3,
        seed=1,
    )
    aug_cfg = cfg.model_copy(update={"augment": AugmentConfig(**PHOTOMETRIC)})
    a = build_dataset(aug_cfg, norm="unit", num_classes=3, seed=1)
    again = build_dataset(aug_cfg, norm="unit", num_classes=3, seed=1)
    other_seed = build_dataset(aug_cfg, norm="unit", num_classes=3, seed=2)
    changed = 0
    for i in range(9):
        p, o, x, y = plain[i], off[i], a[i], again[i]
        assert torch.equal(p["image"], o["image"]) and torch.equal(p["label"], o["label"])  # all off = none
        assert torch.equal(x["image"], y["image"])  # same seed, same index: same pixels
        assert torch.equal(x["label"], p["label"])  # labels untouched
        changed += int(not torch.equal(x["image"], p["image"]))
    assert changed >= 8
    assert any(not torch.equal(a[i]["image"], other_seed[i]["image"]) for i in range(3))
    assert not torch.equal(a[0]["image"], a[3]["image"])  # another epoch of sample 0: other draws
    # the network input without augmentation (evaluation, pseudo labels) is unaffected
    assert torch.equal(a.prepare_image(0), plain.prepare_image(0))


def test_config_rejects_bad_photometric_values(tmp_path):
    base = tmp_path / "c.yaml"
    base.write_text(
        "model: {arch: small, num_classes: 7}\nsource: {kind: synthetic, size: [64, 32]}\n"
        "target: {kind: synthetic, domain: target, size: [64, 32]}\n"
    )
    with pytest.raises(ConfigError, match=r"'source.augment.hue'.*less than or equal to 0.5"):
        load_config(base, ["source.augment.hue=0.7"])
    with pytest.raises(ConfigError, match=r"blur_sigma must be \(min, max\) with 0 <= min <= max"):
        load_config(base, ["source.augment.blur_sigma=[2, 1]"])
    with pytest.raises(ConfigError, match=r"'source.augment.grayscale_prob'.*less than or equal to 1"):
        load_config(base, ["source.augment.grayscale_prob=1.5"])
    cfg = load_config(base, ["target.augment.brightness=0.3", "target.augment.blur_prob=0.2"])
    assert cfg.target.augment.brightness == 0.3 and cfg.source.augment == AugmentConfig()
