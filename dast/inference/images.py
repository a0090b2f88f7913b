"""Reading image files for prediction: RGB pixels, or only the size from the header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dast.errors import DataError

READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 RGB; an unreadable file is a :class:`DataError`."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except READ_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except READ_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc
