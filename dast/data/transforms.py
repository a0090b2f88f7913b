"""Image preparation: resizing, normalisation and the inverse for display, and the
photometric augmentations.

The released code resizes with PIL (bicubic for images, nearest for labels), converts
to float32, reverses RGB to BGR and subtracts the caffe mean. ``caffe`` reproduces that
exactly; ``imagenet`` is the torchvision convention (RGB, /255, mean/std); ``unit`` is
RGB/255 (used by the small demo backbone trained from scratch).

The photometric functions map an H x W x 3 uint8 RGB image to a new one (rounded to the
nearest integer and clipped to 0..255); they never see labels. Grey values are the
ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B``, as in PIL's ``convert("L")``.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image

Norm = Literal["caffe", "imagenet", "unit"]
NORMS = ("caffe", "imagenet", "unit")

CAFFE_MEAN_BGR = np.array((104.00698793, 116.66876762, 122.67891434), dtype=np.float32)
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)
LUMA_WEIGHTS = np.array((0.299, 0.587, 0.114), dtype=np.float64)  # ITU-R 601-2, R G B


def resize_image(img: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize an H x W x 3 uint8 RGB image to ``size`` = (width, height) with PIL bicubic."""
    if size is None or (img.shape[1], img.shape[0]) == tuple(size):
        return img
    return np.asarray(Image.fromarray(img).resize((size[0], size[1]), Image.Resampling.BICUBIC))


def resize_label(label: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize an H x W label map to ``size`` = (width, height) with nearest neighbour."""
    if size is None or (label.shape[1], label.shape[0]) == tuple(size):
        return label
    return np.asarray(Image.fromarray(label).resize((size[0], size[1]), Image.Resampling.NEAREST))


def normalize(img: np.ndarray, norm: str) -> torch.Tensor:
    """H x W x 3 uint8 RGB -> 3 x H x W float32 tensor in the network's input convention."""
    if norm == "caffe":
        arr = np.asarray(img, np.float32)[:, :, ::-1] - CAFFE_MEAN_BGR
    elif norm == "imagenet":
        arr = (np.asarray(img, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    elif norm == "unit":
        arr = np.asarray(img, np.float32) / 255.0
    else:
        raise ValueError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMS)}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def denormalize(x: torch.Tensor, norm: str) -> np.ndarray:
    """Invert :func:`normalize`: 3 x H x W tensor -> H x W x 3 uint8 RGB."""
    arr = x.detach().float().cpu().numpy().transpose(1, 2, 0)
    if norm == "caffe":
        arr = (arr + CAFFE_MEAN_BGR)[:, :, ::-1]
    elif norm == "imagenet":
        arr = (arr * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    elif norm == "unit":
        arr = arr * 255.0
    else:
        raise ValueError(f"unknown normalisation {norm!r}")
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Photometric augmentation (images only)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def luma(img: np.ndarray) -> np.ndarray:
    """H x W x 3 RGB -> H x W float64 grey values (ITU-R 601-2 luma)."""
    return np.asarray(img, np.float64) @ LUMA_WEIGHTS


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Every channel times ``factor`` (0 gives black, 1 the image itself)."""
    return _to_uint8(np.asarray(img, np.float64) * float(factor))


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's mean grey value: ``factor * img + (1 - factor) * mean``."""
    f = float(factor)
    return _to_uint8(f * np.asarray(img, np.float64) + (1.0 - f) * float(luma(img).mean()))


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image: ``factor * img + (1 - factor) * luma`` (0 gives grey)."""
    f = float(factor)
    return _to_uint8(f * np.asarray(img, np.float64) + (1.0 - f) * luma(img)[..., None])


def adjust_hue(img: np.ndarray, shift: float) -> np.ndarray:
    """Rotate every pixel's hue by ``shift`` turns of the colour wheel (1/3: red -> green)."""
    if shift == 0:
        return np.array(img, np.uint8)
    hsv = cv2.cvtColor(np.asarray(img, np.float32) / 255.0, cv2.COLOR_RGB2HSV)  # H in degrees
    hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(360.0 * float(shift)), np.float32(360.0))
    return _to_uint8(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0)


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """Three equal channels holding the luma (rounded), so the shape stays H x W x 3."""
    grey = _to_uint8(luma(img))
    return np.repeat(grey[..., None], 3, axis=2)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (OpenCV, kernel +-3 sigma, reflected borders); ``sigma <= 0`` is the identity."""
    if sigma <= 0:
        return np.array(img, np.uint8)
    src = np.ascontiguousarray(img, dtype=np.uint8)
    return cv2.GaussianBlur(src, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma), borderType=cv2.BORDER_REFLECT_101)


def jitter_factor(rng: np.random.Generator, strength: float) -> float:
    """A multiplicative factor drawn uniformly from ``[max(0, 1 - strength), 1 + strength]``."""
    return float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
