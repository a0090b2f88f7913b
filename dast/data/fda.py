"""Fourier Domain Adaptation (Yang & Soatto, CVPR 2020): restyle an image with another's
low-frequency amplitude spectrum.

DAST uses it only for label-free model selection: source validation images restyled to
the target domain with ``beta = 0.5`` and ``beta = 0.9``, and the two mIoUs averaged.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def low_frequency_window(shape: tuple[int, int], beta: float) -> np.ndarray:
    """Boolean H x W mask (unshifted FFT layout) of the centred low-frequency window.

    Along an axis of length ``n`` the integer frequencies are ``k = -n//2 .. (n-1)//2``
    (``np.fft.fftfreq(n) * n``); the window keeps ``|k| <= beta * n / 2``, i.e. the
    frequencies up to ``beta`` times the Nyquist frequency. ``beta = 1`` covers the whole
    spectrum; a small ``beta`` (below ``2 / n`` on both axes) keeps only the DC term. The
    window is symmetric under ``k -> -k``, so it preserves conjugate symmetry.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    axes = []
    for n in shape:
        k = np.rint(np.fft.fftfreq(n) * n)
        axes.append(np.abs(k) <= beta * n / 2.0 + 1e-9)
    return axes[0][:, None] & axes[1][None, :]


def fda_transfer(source: np.ndarray, target: np.ndarray, beta: float) -> np.ndarray:
    """Give ``source`` the low-frequency amplitude spectrum of ``target``.

    Both are float H x W x C arrays of the same shape. Per channel: 2-D FFT (viewed with
    ``fftshift``, the window is centred on the DC term), the amplitude inside the window
    of :func:`low_frequency_window` is replaced by the target's, the source phase is kept,
    and the real part of the inverse FFT is returned as float64 (not clipped).
    """
    src = np.asarray(source, np.float64)
    tgt = np.asarray(target, np.float64)
    if src.shape != tgt.shape:
        raise ValueError(f"source and target must have the same shape, got {src.shape} and {tgt.shape}")
    if src.ndim != 3:
        raise ValueError(f"expected H x W x C arrays, got shape {src.shape}")
    fs = np.fft.fft2(src, axes=(0, 1))
    ft = np.fft.fft2(tgt, axes=(0, 1))
    window = low_frequency_window(src.shape[:2], beta)[..., None]
    amplitude = np.where(window, np.abs(ft), np.abs(fs))
    mixed = amplitude * np.exp(1j * np.angle(fs))
    return np.real(np.fft.ifft2(mixed, axes=(0, 1)))


def fda_image(source_rgb: np.ndarray, target_rgb: np.ndarray, beta: float) -> np.ndarray:
    """:func:`fda_transfer` on uint8 RGB images; the target is resized (bicubic) to the
    source size if needed and the result is rounded and clipped to uint8."""
    src = np.asarray(source_rgb)
    tgt = np.asarray(target_rgb)
    if src.ndim != 3 or tgt.ndim != 3 or src.shape[2] != tgt.shape[2]:
        raise ValueError(f"expected two H x W x C images, got shapes {src.shape} and {tgt.shape}")
    if tgt.shape[:2] != src.shape[:2]:
        tgt = np.asarray(Image.fromarray(tgt).resize((src.shape[1], src.shape[0]), Image.Resampling.BICUBIC))
    out = fda_transfer(src.astype(np.float64), tgt.astype(np.float64), beta)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
