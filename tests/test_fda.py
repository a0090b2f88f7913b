"""FDA: amplitude/phase exchange, the window definition, the uint8 wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dast.config import DatasetConfig
from dast.data import fda
from dast.data.datasets import build_dataset
from dast.data.fda import fda_image, fda_transfer, low_frequency_window
from dast.training.selection import FDAValSet

SHAPES = [(8, 12, 3), (7, 9, 3), (6, 5, 1)]  # even, odd, mixed


def _pair(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, shape), rng.uniform(0, 255, shape) * 0.5 + 40.0


@pytest.mark.parametrize("shape", SHAPES)
def test_full_window_gives_target_amplitude_and_source_phase(shape: tuple[int, int, int]) -> None:
    src, tgt = _pair(shape)
    out = fda_transfer(src, tgt, 1.0)
    assert out.shape == src.shape and out.dtype == np.float64
    f_out, f_src, f_tgt = (np.fft.fft2(a, axes=(0, 1)) for a in (out, src, tgt))
    np.testing.assert_allclose(np.abs(f_out), np.abs(f_tgt), rtol=1e-9, atol=1e-8)
    significant = (np.abs(f_src) > 1e-6) & (np.abs(f_tgt) > 1e-6)
    phase_src = f_src[significant] / np.abs(f_src[significant])
    phase_out = f_out[significant] / np.abs(f_out[significant])
    np.testing.assert_allclose(phase_out, phase_src, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_tiny_window_only_swaps_the_mean(shape: tuple[int, int, int]) -> None:
    src, tgt = _pair(shape, seed=1)
    out = fda_transfer(src, tgt, 0.01)
    expected = src - src.mean(axis=(0, 1)) + tgt.mean(axis=(0, 1))
    np.testing.assert_allclose(out, expected, atol=1e-9)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), tgt.mean(axis=(0, 1)), atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [0.3, 0.5, 0.9])
def test_partial_window_mixes_amplitudes_and_stays_real(shape: tuple[int, int, int], beta: float) -> None:
    src, tgt = _pair(shape, seed=2)
    out = fda_transfer(src, tgt, beta)
    window = low_frequency_window(shape[:2], beta)[..., None]
    f_out, f_src, f_tgt = (np.fft.fft2(a, axes=(0, 1)) for a in (out, src, tgt))
    # if the mixed spectrum were not conjugate-symmetric, dropping the imaginary part
    # would change these amplitudes
    expected = np.where(window, np.abs(f_tgt), np.abs(f_src))
    np.testing.assert_allclose(np.abs(f_out), expected, rtol=1e-9, atol=1e-8)


def test_window_sizes_by_hand() -> None:
    # n=8: k = -4..3; beta=0.5 keeps |k| <= 2 -> 5 bins; n=7: |k| <= 1.75 -> 3 bins
    assert low_frequency_window((8, 7), 0.5).sum() == 5 * 3
    assert low_frequency_window((8, 7), 1.0).all()
    small = low_frequency_window((8, 7), 0.1)
    assert small.sum() == 1 and small[0, 0]  # only DC (unshifted layout)
    # centred after fftshift: rows k=-2..2 of n=8 sit at shifted positions 2..6
    shifted = np.fft.fftshift(low_frequency_window((8, 8), 0.5))
    assert np.array_equal(np.flatnonzero(shifted.any(axis=1)), np.arange(2, 7))


@pytest.mark.parametrize("n", [5, 6, 9, 10])
@pytest.mark.parametrize("beta", [0.2, 0.5, 0.77, 1.0])
def test_window_is_symmetric_under_negated_frequencies(n: int, beta: float) -> None:
    w = low_frequency_window((n, n + 1), beta)
    neg = w[(-np.arange(n)) % n][:, (-np.arange(n + 1)) % (n + 1)]
    assert np.array_equal(w, neg)


def test_fda_image_uint8_and_resizes_target() -> None:
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)
    tgt = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = fda_image(src, tgt, 0.5)
    assert out.shape == src.shape and out.dtype == np.uint8
    # beta -> 0 with a flat target: the source shifted to the target's mean, then clipped
    flat = np.full((4, 4, 3), (10, 128, 250), np.uint8)
    shifted = fda_image(src, flat, 0.0)
    expected = np.clip(np.rint(src - src.mean(axis=(0, 1)) + np.array([10.0, 128.0, 250.0])), 0, 255)
    np.testing.assert_array_equal(shifted, expected.astype(np.uint8))


def test_fda_image_with_itself_is_identity() -> None:
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (11, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fda_image(img, img, 0.9), img)


def test_rejects_bad_inputs() -> None:
    a = np.zeros((4, 4, 3))
    with pytest.raises(ValueError, match="same shape"):
        fda_transfer(a, np.zeros((4, 5, 3)), 0.5)
    with pytest.raises(ValueError, match="beta"):
        fda_transfer(a, a, 1.5)
    with pytest.raises(ValueError, match="H x W x C"):
        fda_transfer(np.zeros((4, 4)), np.zeros((4, 4)), 0.5)


def test_selection_set_restyles_each_image_once_and_matches_a_fresh_restyle(monkeypatch: pytest.MonkeyPatch) -> None:
    def synthetic(domain: str, seed: int):  # type: ignore[no-untyped-def]
        cfg = DatasetConfig(kind="synthetic", domain=domain, count=6, size=(48, 32))
        return build_dataset(cfg, norm="unit", num_classes=7, with_labels=True, seed=seed)

    source, target = synthetic("source", 0), synthetic("target", 1)
    calls: list[int] = []
    real = fda.fda_image
    monkeypatch.setattr(fda, "fda_image", lambda *a: calls.append(1) or real(*a))
    ds = FDAValSet(source, target, num_images=4, beta=0.5, seed=3)
    first = [ds.prepare_image(i) for i in range(len(ds))] + [ds.prepare_image(i) for i in range(len(ds))]
    assert len(calls) == 4  # the second pass reads the cache
    for i in range(len(ds)):
        src = source.read_image_rgb(ds.src_idx[i])
        want = real(src, target.read_image_rgb(ds.tgt_idx[i]), 0.5)
        np.testing.assert_array_equal(ds.read_image_rgb(i), want)
        assert torch.equal(first[i], first[i + len(ds)])
        assert not ds.read_image_rgb(i).flags.writeable
    # past the byte budget images are restyled again each time, with the same result
    small = FDAValSet(source, target, num_images=4, beta=0.5, seed=3)
    small.CACHE_BYTES = 48 * 32 * 3  # room for one image
    calls.clear()
    again = [small.read_image_rgb(i) for i in range(4)] + [small.read_image_rgb(i) for i in range(4)]
    assert len(calls) == 7 and all(np.array_equal(a, ds.read_image_rgb(i % 4)) for i, a in enumerate(again))
