"""Image preparation: resizing, normalisation and the inverse for display.

The released code resizes with PIL (bicubic for images, nearest for labels), converts
to float32, reverses RGB to BGR and subtracts the caffe mean. ``caffe`` reproduces that
exactly; ``imagenet`` is the torchvision convention (RGB, /255, mean/std); ``unit`` is
RGB/255 (used by the small demo backbone trained from scratch).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

Norm = Literal["caffe", "imagenet", "unit"]
NORMS = ("caffe", "imagenet", "unit")

CAFFE_MEAN_BGR = np.array((104.00698793, 116.66876762, 122.67891434), dtype=np.float32)
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)


def resize_image(img: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize an H x W x 3 uint8 RGB image to ``size`` = (width, height) with PIL bicubic."""
    if size is None or (img.shape[1], img.shape[0]) == tuple(size):
        return img
    return np.asarray(Image.fromarray(img).resize(tuple(size), Image.BICUBIC))


def resize_label(label: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize an H x W label map to ``size`` = (width, height) with nearest neighbour."""
    if size is None or (label.shape[1], label.shape[0]) == tuple(size):
        return label
    return np.asarray(Image.fromarray(label).resize(tuple(size), Image.NEAREST))


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
