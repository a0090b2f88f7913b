"""A trained model as a Python predictor: images in, label maps (and more) out.

:class:`Segmenter` is the one inference path of dast: ``dast predict`` and
:func:`dast.inference.predict.predict_paths` run through it too. For every image it

1. takes the pixels as H x W x 3 uint8 RGB (see :func:`as_rgb_images` for the inputs it accepts);
2. applies the checkpoint's preprocessing: resize to ``spec.input_size`` with PIL bicubic
   (kept as is when the spec has none), normalise with ``spec.norm``
   (:mod:`dast.data.transforms`);
3. runs the target path (segmentor + discoverer attention) in eval mode without
   gradients, optionally under autocast, and casts the outputs back to float32;
4. upsamples the logits and the attention map bilinearly (``align_corners=True``) to the
   ORIGINAL image size; the labels are the argmax of the upsampled logits, the
   probabilities their softmax.

Eval mode is entered for each call and the networks' previous train/eval flags are
restored afterwards, so a Segmenter can wrap networks that are still being trained.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from dast.contexts import autocast, eval_mode
from dast.data.transforms import normalize, resize_image
from dast.errors import UserError
from dast.inference.images import read_rgb
from dast.inference.visualize import palette_for
from dast.losses import upsample
from dast.models.io import ModelSpec, Networks, load_networks

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, "os.PathLike[str]"]


class ImageInputError(UserError, ValueError):
    """An image given to :class:`Segmenter` has the wrong type, shape, dtype or value range."""


@dataclass(frozen=True)
class Prediction:
    """What :meth:`Segmenter.predict` returns.

    For one image the arrays have no batch axis; for an N x 3 x H x W tensor they have a
    leading N. H x W is the original image size; h x w the network's output size
    (output stride 8 of the preprocessed input).

    * ``labels``: int64 class indices, ``H x W`` (``N x H x W``).
    * ``probabilities``: float32 softmax of the upsampled logits, ``C x H x W``
      (``N x C x H x W``); None unless requested.
    * ``attention``: float32 discoverer attention ``|tanh(D(f))|`` upsampled to the image,
      in [0, 1], ``H x W`` (``N x H x W``); None unless requested, and None for a model
      without discoverer attention (source-only, output-space-only, ``attention: false``).
    * ``logits``: float32 raw target-path output before upsampling, ``C x h x w``
      (``N x C x h x w``), the array ``dast predict --save-logits`` stores; None unless requested.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    attention: np.ndarray | None = None
    logits: np.ndarray | None = None


def prepare_image(rgb: np.ndarray, size: tuple[int, int] | None, norm: str) -> torch.Tensor:
    """H x W x 3 uint8 RGB -> 3 x h x w network input: PIL-bicubic resize to ``size``
    (width, height; None keeps the size), then the ``norm`` normalisation."""
    return normalize(resize_image(rgb, size), norm)


def _check_rgb_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageInputError(f"expected an H x W x 3 RGB array, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ImageInputError(
            f"expected a uint8 array (RGB values 0..255), got dtype {arr.dtype}; "
            "convert it with np.clip(a, 0, 255).astype(np.uint8)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageInputError(f"the image is empty (shape {tuple(arr.shape)})")
    return np.ascontiguousarray(arr)


def _tensor_to_rgb(t: torch.Tensor) -> list[np.ndarray]:
    """N x 3 x H x W tensor (uint8, or float 0..255) -> N arrays H x W x 3 uint8."""
    if t.ndim != 4 or t.shape[1] != 3:
        raise ImageInputError(f"expected an N x 3 x H x W (or 3 x H x W) RGB tensor, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[2] == 0 or t.shape[3] == 0:
        raise ImageInputError(f"the image batch is empty (shape {tuple(t.shape)})")
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise ImageInputError("the image tensor holds NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 255.0:
            raise ImageInputError(
                f"expected RGB values in 0..255 (not normalised), got values from {lo:.3g} to {hi:.3g}"
            )
        t = torch.round(t).to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise ImageInputError(f"expected a uint8 or floating-point tensor, got dtype {t.dtype}")
    arr = t.permute(0, 2, 3, 1).numpy()
    return [np.ascontiguousarray(a) for a in arr]


def as_rgb_images(image: Any) -> tuple[list[np.ndarray], bool]:
    """The pixels of ``image`` as H x W x 3 uint8 RGB arrays, and whether it was a batch.

    Accepted:

    * a PIL image (any mode; converted to RGB as ``dast predict`` does with files);
    * a numpy array H x W x 3, dtype uint8, RGB;
    * a file path (``str`` or ``os.PathLike``), read with PIL as ``dast predict`` does;
    * a torch tensor N x 3 x H x W (a batch) or 3 x H x W (one image), RGB, values 0..255
      and NOT normalised: uint8, or floating point (rounded to whole values, since the
      preprocessing resizes 8-bit images). It may live on any device.

    Anything else is an :class:`ImageInputError` (a :class:`UserError` and a ``ValueError``).
    """
    if isinstance(image, Image.Image):
        return [np.asarray(image.convert("RGB"), dtype=np.uint8)], False
    if isinstance(image, np.ndarray):
        return [_check_rgb_array(image)], False
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            return _tensor_to_rgb(image.unsqueeze(0)), False
        return _tensor_to_rgb(image), True
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageInputError(f"image file not found: {path}")
        return [read_rgb(path)], False
    raise ImageInputError(
        "expected a PIL image, an H x W x 3 uint8 numpy array, an (N x) 3 x H x W tensor "
        f"or an image path, got {type(image).__name__}"
    )


class Segmenter:
    """Predict label maps (and probabilities, attention, logits) with a trained model.

    >>> seg = Segmenter.from_checkpoint("model.safetensors", device="cpu")  # doctest: +SKIP
    >>> labels = seg(Image.open("street.png"))                              # doctest: +SKIP

    ``input_size`` and ``norm`` start as the checkpoint's (``spec.input_size``,
    ``spec.norm``); set ``seg.input_size = None`` to feed images at their own size, or
    another (width, height). ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the network
    under autocast; the outputs are float32 either way.
    """

    def __init__(
        self, nets: Networks, device: torch.device | str = "cpu", *, amp_dtype: torch.dtype | None = None
    ) -> None:
        self.device = torch.device(device)
        self.nets = nets.to(self.device)
        self.model = nets.target_model()
        self.input_size: tuple[int, int] | None = nets.spec.input_size
        self.norm: str = nets.spec.norm
        self.amp_dtype = amp_dtype

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], device: torch.device | str = "cpu", *, amp_dtype: torch.dtype | None = None
    ) -> Segmenter:
        """Load a dast checkpoint (``.safetensors``) onto ``device``."""
        nets, _, _ = load_networks(Path(path), device)
        return cls(nets, device, amp_dtype=amp_dtype)

    # ------------------------------------------------------------------ facts about the model

    @property
    def spec(self) -> ModelSpec:
        return self.nets.spec

    @property
    def num_classes(self) -> int:
        return self.nets.spec.num_classes

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        """The checkpoint's class colours (Cityscapes or a generated palette when unset)."""
        return palette_for(self.spec.num_classes, self.spec.class_colors or None)

    @property
    def has_attention(self) -> bool:
        """Whether the target path applies discoverer attention."""
        return self.model.discoverer is not None

    # ------------------------------------------------------------------ the pieces

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """One H x W x 3 uint8 RGB image -> its 3 x h x w network input (on the CPU)."""
        return prepare_image(rgb, self.input_size, self.norm)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Eval mode (previous flags restored on exit) and no gradients."""
        with eval_mode(self.model), torch.no_grad():
            yield

    def forward_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the target path on preprocessed inputs N x 3 x h x w.

        Returns float32 (logits N x C x h' x w', attention N x 1 x h' x w'); the attention
        is all zeros for a model without discoverer attention. Call inside :meth:`session`.
        """
        x = x.to(self.device)
        with autocast(self.device, None if self.amp_dtype == torch.float32 else self.amp_dtype):
            logits, att = self.model(x)
        return logits.float(), att.float()

    @staticmethod
    def upsample(
        logits: torch.Tensor, attention: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear (``align_corners=True``) upsampling to ``size`` = (height, width).

        Returns (logits N x C x H x W, attention N x H x W clamped to [0, 1]).
        """
        return upsample(logits, size), upsample(attention, size)[:, 0].clamp(0.0, 1.0)

    # ------------------------------------------------------------------ the predictor

    def __call__(self, image: ImageInput) -> np.ndarray:
        """The label map: int64, H x W for one image, N x H x W for an N x 3 x H x W tensor."""
        return self.predict(image).labels

    def predict(
        self, image: ImageInput, *, probabilities: bool = False, attention: bool = False, logits: bool = False
    ) -> Prediction:
        """Predict one image (or a batch tensor); see :class:`Prediction` for the arrays.

        ``image`` is anything :func:`as_rgb_images` accepts. A batch runs as one forward pass.
        """
        images, batched = as_rgb_images(image)
        h, w = images[0].shape[:2]
        x = torch.stack([self.prepare(rgb) for rgb in images])
        with self.session():
            raw, att = self.forward_batch(x)
            up, att_up = self.upsample(raw, att, (h, w))
            labels = up.argmax(dim=1)  # int64
            probs = torch.softmax(up, dim=1) if probabilities else None

        def out(t: torch.Tensor) -> np.ndarray:
            arr = t.cpu().numpy()
            return arr if batched else arr[0]

        return Prediction(
            labels=out(labels),
            probabilities=out(probs) if probs is not None else None,
            attention=out(att_up) if attention and self.has_attention else None,
            logits=out(raw) if logits else None,
        )
