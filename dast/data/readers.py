"""Read dataset images and labels, checking their encoding; every failure is a DataError.

Each label reader returns a uint8 H x W map of train ids with 255 for ignored pixels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dast.constants import IGNORE_INDEX
from dast.data.labels import (
    CITYSCAPES_MAX_ID,
    cityscapes_id_to_train_lut,
    synthia_id_to_train_lut,
)
from dast.errors import DataError

PathLike = str | os.PathLike[str]
SINGLE_CHANNEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")
COLOUR_LABEL_HINT = " (a colour label? convert colour labels to class indices with 'dast convert labels')"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@functools.cache
def _cityscapes_lut() -> np.ndarray:
    return cityscapes_id_to_train_lut()


@functools.cache
def _synthia_lut() -> np.ndarray:
    return synthia_id_to_train_lut()


def _open_fully(path: PathLike, what: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} not found: {p}")
    try:
        img = Image.open(p)
        img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"cannot read {what} {p}: {_reason(exc)}") from None
    return img


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as an H x W x 3 uint8 RGB array."""
    img = _open_fully(path, "image")
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from None


def image_size(path: PathLike) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding the pixels."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            return img.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"cannot read image {p}: {_reason(exc)}") from None


def read_single_channel(path: PathLike, colour_hint: str = "") -> np.ndarray:
    """Read a single-channel label PNG (grey or palette) as its raw pixel values.

    ``colour_hint`` is appended to the error for an RGB or RGBA image."""
    img = _open_fully(path, "label")
    if img.mode not in SINGLE_CHANNEL_MODES:
        hint = colour_hint if img.mode in ("RGB", "RGBA") else ""
        raise DataError(f"expected a single-channel label image, got {img.mode}: {path}{hint}")
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise DataError(f"expected a single-channel label image, got shape {arr.shape}: {path}")
    if img.mode == "1":
        arr = arr.astype(np.uint8)
    return arr


def _check_max(arr: np.ndarray, path: PathLike, top: int, allowed_extra: tuple[int, ...] = ()) -> None:
    bad = (arr > top) | (arr < 0)
    for extra in allowed_extra:
        bad &= arr != extra
    if bad.any():
        values = np.unique(arr[bad])
        shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        allowed = f"0..{top}" + "".join(f" or {e}" for e in allowed_extra)
        raise DataError(f"label {path} has value(s) {shown} outside {allowed}")


def _read_cityscapes_ids(path: PathLike) -> np.ndarray:
    ids = read_single_channel(path)
    _check_max(ids, path, CITYSCAPES_MAX_ID)
    return _cityscapes_lut()[ids.astype(np.intp)]


def read_gta5_label(path: PathLike) -> np.ndarray:
    """A GTA5 label (8-bit palette PNG of Cityscapes label ids) -> train ids."""
    return _read_cityscapes_ids(path)


def read_cityscapes_label(path: PathLike) -> np.ndarray:
    """A Cityscapes ``*_gtFine_labelIds.png`` -> train ids."""
    return _read_cityscapes_ids(path)


def read_synthia_ids(path: PathLike) -> np.ndarray:
    """The raw SYNTHIA class ids: the last channel of OpenCV's unchanged read."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"label not found: {p}")
    arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"cannot read label {p}: not a readable image")
    if arr.ndim != 3 or arr.shape[2] < 2:
        raise DataError(
            f"expected a multi-channel SYNTHIA label (class id in the last channel), got a single-channel image: {p}"
        )
    if arr.dtype not in (np.uint16, np.uint8):
        raise DataError(f"expected a 16-bit or 8-bit SYNTHIA label, got {arr.dtype}: {p}")
    return np.ascontiguousarray(arr[:, :, -1])


def read_synthia_label(path: PathLike) -> np.ndarray:
    """A SYNTHIA-RAND-CITYSCAPES ``GT/LABELS`` PNG -> train ids."""
    return _synthia_lut()[read_synthia_ids(path).astype(np.intp)]


def read_index_label(path: PathLike, num_classes: int) -> np.ndarray:
    """A single-channel class-index PNG (values < num_classes, 255 = ignore) -> uint8."""
    arr = read_single_channel(path, COLOUR_LABEL_HINT)
    _check_max(arr, path, num_classes - 1, (IGNORE_INDEX,))
    return arr.astype(np.uint8)


def label_reader(kind: str, num_classes: int) -> Callable[[PathLike], np.ndarray]:
    """The label reader of a dataset kind."""
    if kind == "gta5":
        return read_gta5_label
    if kind == "cityscapes":
        return read_cityscapes_label
    if kind == "synthia":
        return read_synthia_label
    if kind == "folder":
        return functools.partial(read_index_label, num_classes=num_classes)
    raise ValueError(f"no label files for dataset kind {kind!r}")
