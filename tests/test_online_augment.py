"""The strong augmentation on tensors: normalisation round trip, each colour operation
against the project's uint8 version, the blur kernel, the switches and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dast.data import transforms as np_ops
from dast.training.online.augment import (
    StrongAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_strong,
    blur_kernel_size,
    color_jitter,
    draw_params,
    from_unit_rgb,
    gaussian_blur,
    gaussian_kernels,
    hsv_to_rgb,
    rgb_to_hsv,
    strong_augment,
    to_unit_rgb,
)

NORMS = ("caffe", "imagenet", "unit")


def _uint8_image(seed: int = 0, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _as_unit(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def _as_uint8(rgb: torch.Tensor) -> np.ndarray:
    return rgb[0].permute(1, 2, 0).mul(255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def _batch(norm: str, n: int = 3) -> torch.Tensor:
    return torch.stack([np_ops.normalize(_uint8_image(i, 16, 20), norm) for i in range(n)])


@pytest.mark.parametrize("norm", NORMS)
def test_denormalisation_inverts_the_datasets_normalisation(norm: str):
    img = _uint8_image()
    x = np_ops.normalize(img, norm)[None]
    rgb = to_unit_rgb(x, norm)
    assert torch.allclose(rgb, _as_unit(img), atol=1e-5)
    assert torch.allclose(from_unit_rgb(rgb, norm), x, atol=1e-4)
    with pytest.raises(ValueError, match="unknown normalisation 'bgr'"):
        to_unit_rgb(x, "bgr")


def test_colour_operations_match_the_projects_uint8_versions():
    img = _uint8_image(3, 8, 9)
    x = _as_unit(img)
    one = torch.ones(1)
    for ours, theirs, f in [
        (adjust_brightness, np_ops.adjust_brightness, 1.3),
        (adjust_brightness, np_ops.adjust_brightness, 0.7),
        (adjust_contrast, np_ops.adjust_contrast, 0.6),
        (adjust_contrast, np_ops.adjust_contrast, 1.4),
        (adjust_saturation, np_ops.adjust_saturation, 0.0),
        (adjust_saturation, np_ops.adjust_saturation, 1.8),
        (adjust_hue, np_ops.adjust_hue, 0.2),
        (adjust_hue, np_ops.adjust_hue, -0.35),
    ]:
        got = _as_uint8(ours(x, one * f)).astype(int)
        want = theirs(img, f).astype(int)
        assert np.abs(got - want).max() <= 1, (ours.__name__, f)


def test_hsv_hand_values_and_round_trip():
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    x = rgb.T.reshape(1, 3, 1, 5)
    hsv = rgb_to_hsv(x)[0, :, 0].T
    want = [[0.0, 1.0, 1.0], [1 / 3, 1.0, 1.0], [2 / 3, 1.0, 1.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    assert torch.allclose(hsv, torch.tensor(want), atol=1e-7)
    # a third of a turn sends red to green and green to blue
    shifted = adjust_hue(x, torch.tensor([1 / 3]))[0, :, 0].T
    assert shifted[0].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    assert shifted[1].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)
    rand = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rand)), rand, atol=1e-6)


def test_blur_kernel_size_is_the_largest_odd_number_within_a_tenth():
    # DACS: floor(ceil(0.1 L) - 0.5 + ceil(0.1 L) % 2)
    for length in (1, 10, 32, 64, 100, 512, 720, 1024, 1280):
        k = math.ceil(0.1 * length)
        assert blur_kernel_size(length) == max(1, math.floor(k - 0.5 + k % 2)), length
    assert [blur_kernel_size(n) for n in (512, 720, 1024, 64, 10)] == [51, 71, 103, 7, 1]


def test_blur_of_an_impulse_is_the_outer_product_of_the_gaussian():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    out = gaussian_blur(x, torch.tensor([1.0]), kernel_size=(5, 5))
    g = torch.tensor([math.exp(-(i**2) / 2.0) for i in range(-2, 3)])
    g = g / g.sum()
    assert torch.allclose(out[0, 0, 2:7, 2:7], torch.outer(g, g), atol=1e-7)
    assert out[0, 0, :2].abs().max() == 0.0  # nothing beyond the kernel's reach
    assert torch.allclose(gaussian_kernels(torch.tensor([1.0]), 5)[0].float(), g)
    # a constant image stays constant, borders included (reflected)
    flat = torch.full((2, 3, 6, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 1.1]), (5, 7)), flat, atol=1e-6)
    # each image has its own sigma
    two = torch.cat([x, x])
    both = gaussian_blur(two, torch.tensor([1.0, 0.5]), (5, 5))
    assert torch.equal(both[0], out[0])
    assert both[1, 0, 4, 4] > both[0, 0, 4, 4]


@pytest.mark.parametrize("norm", NORMS)
def test_switched_off_it_is_the_identity(norm: str):
    x = _batch(norm)
    for settings in (
        StrongAugment(jitter=False, blur=False),
        StrongAugment(jitter_prob=0.0, blur_prob=0.0),
    ):
        out = strong_augment(x, norm, torch.Generator().manual_seed(0), settings)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert torch.allclose(out, x, atol=1e-4 if norm == "caffe" else 1e-6)


def test_each_switch_changes_only_what_it_should():
    norm = "imagenet"
    x = _batch(norm, 4)
    rgb = to_unit_rgb(x, norm)
    jitter_only = StrongAugment(jitter=True, jitter_prob=0.5, blur=False)
    params = draw_params(4, torch.Generator().manual_seed(3), jitter_only)
    assert params.blur is None and params.sigma is None and params.jitter is not None
    out = to_unit_rgb(apply_strong(x, norm, params), norm)
    expect = color_jitter(rgb, params.factors, params.order)
    for b in range(4):
        want = expect[b] if params.jitter[b] else rgb[b]
        assert torch.allclose(out[b], want, atol=1e-5), b
    blur_only = StrongAugment(jitter=False, blur=True, blur_prob=0.5)
    params = draw_params(4, torch.Generator().manual_seed(3), blur_only)
    assert params.jitter is None and params.factors is None and params.blur is not None
    out = to_unit_rgb(apply_strong(x, norm, params), norm)
    expect = gaussian_blur(rgb, params.sigma)
    for b in range(4):
        want = expect[b] if params.blur[b] else rgb[b]
        assert torch.allclose(out[b], want, atol=1e-5), b
    # both kinds of images exist in the draws above (else the test would prove nothing)
    assert 0 < int(params.blur.sum()) < 4


def test_draws_follow_the_published_ranges_and_probabilities():
    settings = StrongAugment()
    params = draw_params(4000, torch.Generator().manual_seed(0), settings)
    assert params.jitter is not None and params.blur is not None
    assert params.factors is not None and params.sigma is not None
    assert abs(params.jitter.double().mean().item() - 0.8) < 0.03  # jitter unless U(0,1) <= 0.2
    assert abs(params.blur.double().mean().item() - 0.5) < 0.03
    f = params.factors
    assert f[:, :3].min() >= 0.8 and f[:, :3].max() <= 1.2
    assert f[:, 3].min() >= -0.2 and f[:, 3].max() <= 0.2
    assert params.sigma.min() >= 0.15 and params.sigma.max() <= 1.15
    assert sorted(params.order) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"jitter_prob must be in \[0, 1\], got 1.5"):
        StrongAugment(jitter_prob=1.5)


def test_the_augmentation_is_fixed_by_the_generator():
    x = _batch("caffe")
    a = strong_augment(x, "caffe", torch.Generator().manual_seed(11))
    b = strong_augment(x, "caffe", torch.Generator().manual_seed(11))
    c = strong_augment(x, "caffe", torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, x, atol=1e-3)  # the default settings do change the batch


def test_the_blur_ignores_autocast():
    x = torch.rand(2, 3, 12, 14, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 1.1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = gaussian_blur(x, sigma)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, gaussian_blur(x, sigma))
