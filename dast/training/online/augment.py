"""The strong photometric augmentation of the mixed image (DACS), on device tensors.

The network's inputs are normalised (``model.norm``: ``caffe``, ``imagenet`` or ``unit``, see
:mod:`dast.data.transforms`). The augmentation maps them to RGB in [0, 1], changes them,
and maps them back:

1. **Colour jitter**, with probability ``jitter_prob`` per image: brightness, contrast,
   saturation and hue, in a random order (one order per batch), each with its own factor.
   For strength ``s`` (DACS/DAFormer ``color_jitter_strength``: 0.2) the brightness,
   contrast and saturation factors are drawn from ``U[max(0, 1 - s), 1 + s]`` and the hue
   shift from ``U[-s, s]`` turns of the colour wheel. The operations are those of
   :mod:`dast.data.transforms` (PIL/torchvision definitions) on float tensors, each
   clamped to [0, 1]:

   * brightness ``f * x``;
   * contrast ``f * x + (1 - f) * mean(luma(x))`` (the image's mean grey value);
   * saturation ``f * x + (1 - f) * luma(x)``;
   * hue: rotate H in HSV by the shift.

   The published code draws ``u ~ U(0, 1)`` and jitters when ``u > color_jitter_probability``
   (0.2), i.e. with probability **0.8**: that is the default of ``jitter_prob`` here. (It
   jitters with kornia 0.5's ``ColorJitter``, whose brightness and contrast are defined
   differently from PIL's; we keep the project's definitions.)
2. **Gaussian blur**, with probability ``blur_prob`` = 0.5 per image, ``sigma ~ U(0.15, 1.15)``
   (both axes), kernel size per axis the largest odd number ``<= ceil(0.1 * length)``
   (DACS's ``floor(ceil(0.1 L) - 0.5 + ceil(0.1 L) % 2)``), reflected borders.

Every random decision comes from a ``torch.Generator`` on the CPU (:func:`draw_params`),
so the same generator state gives the same augmentation on every device. Decisions are per
image (the published code shares one jitter/blur decision across a batch; at batch 1, as
DAST trains, the two agree). A switched-off part draws nothing; with both parts off (or
with every image's decision "no") the output equals the input up to float error of the
normalisation round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dast.data.transforms import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD, LUMA_WEIGHTS, NORMS

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class StrongAugment:
    """Switches and published values of the strong augmentation (see the module docstring)."""

    jitter: bool = True
    jitter_strength: float = 0.2  # DACS/DAFormer color_jitter_strength
    jitter_prob: float = 0.8  # DACS/DAFormer apply it when U(0, 1) > 0.2
    blur: bool = True
    blur_prob: float = 0.5  # DACS/DAFormer: blur when U(0, 1) > 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)

    def __post_init__(self) -> None:
        if self.jitter_strength < 0:
            raise ValueError(f"jitter_strength must be >= 0, got {self.jitter_strength}")
        if self.jitter_strength > 0.5:
            raise ValueError(f"jitter_strength must be <= 0.5 (the hue shift is in turns), got {self.jitter_strength}")
        for name in ("jitter_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {self.blur_sigma}")


@dataclass(frozen=True)
class StrongParams:
    """The random draws of one batch (CPU tensors of length B); None for a part that is off."""

    jitter: Tensor | None  # bool: jitter this image
    factors: Tensor | None  # B x 4: brightness, contrast, saturation factors and the hue shift
    order: tuple[int, ...]  # the order of JITTER_OPS (indices)
    blur: Tensor | None  # bool: blur this image
    sigma: Tensor | None  # float64: the blur's sigma


# ---------------------------------------------------------------------------------------
# Normalisation


def _channel_tensor(values: object, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(1, 3, 1, 1)


def to_unit_rgb(x: Tensor, norm: str) -> Tensor:
    """Network inputs (B x 3 x H x W, normalised with ``norm``) -> RGB in [0, 1] (float32).

    ``caffe``: ``flip_BGR->RGB(x + mean_BGR) / 255``; ``imagenet``: ``x * std + mean``;
    ``unit``: ``x``.
    """
    x = x.float()
    if norm == "caffe":
        return (x + _channel_tensor(CAFFE_MEAN_BGR, x)).flip(1) / 255.0
    if norm == "imagenet":
        return x * _channel_tensor(IMAGENET_STD, x) + _channel_tensor(IMAGENET_MEAN, x)
    if norm == "unit":
        return x
    raise ValueError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMS)}")


def from_unit_rgb(rgb: Tensor, norm: str) -> Tensor:
    """The inverse of :func:`to_unit_rgb`: RGB in [0, 1] -> network inputs."""
    if norm == "caffe":
        return (rgb * 255.0).flip(1) - _channel_tensor(CAFFE_MEAN_BGR, rgb)
    if norm == "imagenet":
        return (rgb - _channel_tensor(IMAGENET_MEAN, rgb)) / _channel_tensor(IMAGENET_STD, rgb)
    if norm == "unit":
        return rgb
    raise ValueError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMS)}")


# ---------------------------------------------------------------------------------------
# Colour operations on RGB in [0, 1], B x 3 x H x W, with one factor per image


def _per_image(values: Tensor, like: Tensor) -> Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1)


def luma(rgb: Tensor) -> Tensor:
    """ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B``: B x 1 x H x W."""
    w = torch.as_tensor(LUMA_WEIGHTS, dtype=rgb.dtype, device=rgb.device).reshape(1, 3, 1, 1)
    return (rgb * w).sum(dim=1, keepdim=True)


def adjust_brightness(rgb: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f * x, 0, 1)`` with ``f = factor[b]`` for image b."""
    return (rgb * _per_image(factor, rgb)).clamp(0.0, 1.0)


def adjust_contrast(rgb: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f * x + (1 - f) * m, 0, 1)``, ``m`` the image's mean luma."""
    f = _per_image(factor, rgb)
    mean = luma(rgb).mean(dim=(1, 2, 3), keepdim=True)
    return (f * rgb + (1.0 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(rgb: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f * x + (1 - f) * luma(x), 0, 1)`` (0 gives grey)."""
    f = _per_image(factor, rgb)
    return (f * rgb + (1.0 - f) * luma(rgb)).clamp(0.0, 1.0)


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] -> HSV with H in [0, 1) turns, S and V in [0, 1] (B x 3 x H x W)."""
    r, g, b = rgb.unbind(dim=1)
    v, argmax = rgb.max(dim=1)
    c = v - rgb.min(dim=1).values
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    h_r = torch.remainder((g - b) / safe_c, 6.0)
    h_g = (b - r) / safe_c + 2.0
    h_b = (r - g) / safe_c + 4.0
    h = torch.where(argmax == 0, h_r, torch.where(argmax == 1, h_g, h_b))
    h = torch.where(c > 0, h / 6.0, torch.zeros_like(h))
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack((h, s, v), dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """The inverse of :func:`rgb_to_hsv`: channel ``n`` (5, 3, 1 for R, G, B) is
    ``V - V S clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 H) mod 6``."""
    h, s, v = hsv.unbind(dim=1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * h, 6.0)
        out.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=1)


def adjust_hue(rgb: Tensor, shift: Tensor) -> Tensor:
    """Rotate every pixel's hue by ``shift[b]`` turns (1/3: red -> green)."""
    hsv = rgb_to_hsv(rgb)
    h = torch.remainder(hsv[:, 0] + shift.to(device=rgb.device, dtype=rgb.dtype).reshape(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1)).clamp(0.0, 1.0)


_JITTER_FUNCTIONS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(rgb: Tensor, factors: Tensor, order: tuple[int, ...] = (0, 1, 2, 3)) -> Tensor:
    """The four operations of :data:`JITTER_OPS` in ``order``, with ``factors[:, i]`` for operation i."""
    for i in order:
        rgb = _JITTER_FUNCTIONS[i](rgb, factors[:, i])
    return rgb


# ---------------------------------------------------------------------------------------
# Gaussian blur


def blur_kernel_size(length: int) -> int:
    """DACS's kernel size for an axis of ``length`` pixels: the largest odd number
    ``<= ceil(0.1 * length)``, written ``floor(ceil(0.1 L) - 0.5 + ceil(0.1 L) % 2)``."""
    k = math.ceil(0.1 * int(length))
    return max(1, k if k % 2 == 1 else k - 1)


def gaussian_kernels(sigma: Tensor, size: int) -> Tensor:
    """One normalised 1-D Gaussian per sigma: ``exp(-x^2 / (2 sigma^2))`` for
    ``x = -(size // 2) .. size // 2``, divided by its sum; len(sigma) x size, float64."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x[None, :] ** 2) / (2.0 * sigma.double()[:, None] ** 2))
    return g / g.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: tuple[int, int] | None = None) -> Tensor:
    """Blur each image ``x[b]`` (B x C x H x W) with a separable Gaussian of ``sigma[b]``.

    ``kernel_size`` = (height, width), both odd (default: :func:`blur_kernel_size` of each
    axis); borders are reflected (``d c b | a b c d | c b a``).
    """
    bsz, ch, height, width = x.shape
    kh, kw = kernel_size if kernel_size is not None else (blur_kernel_size(height), blur_kernel_size(width))
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"blur kernel sizes must be odd, got {(kh, kw)}")
    with torch.autocast(device_type=x.device.type, enabled=False):  # the blur stays in x's precision
        return _separable_blur(x.reshape(1, bsz * ch, height, width), sigma, kh, kw).reshape(bsz, ch, height, width)


def _separable_blur(flat: Tensor, sigma: Tensor, kh: int, kw: int) -> Tensor:
    """Rows, then columns, of a 1 x (B*C) x H x W tensor; image b (channels b*C .. b*C + C - 1)
    uses ``sigma[b]``."""
    groups = flat.shape[1]
    ch = groups // sigma.numel()
    kernel_w = gaussian_kernels(sigma, kw).to(device=flat.device, dtype=flat.dtype).repeat_interleave(ch, dim=0)
    kernel_h = gaussian_kernels(sigma, kh).to(device=flat.device, dtype=flat.dtype).repeat_interleave(ch, dim=0)
    flat = F.conv2d(F.pad(flat, (kw // 2, kw // 2, 0, 0), mode="reflect"), kernel_w[:, None, None, :], groups=groups)
    return F.conv2d(F.pad(flat, (0, 0, kh // 2, kh // 2), mode="reflect"), kernel_h[:, None, :, None], groups=groups)


# ---------------------------------------------------------------------------------------
# The augmentation


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def draw_params(batch: int, generator: torch.Generator, settings: StrongAugment) -> StrongParams:
    """The random draws for a batch, from a CPU ``generator``. For the jitter (when on): B
    uniforms for the decision, B x 4 factors, one permutation of the four operations; then
    for the blur (when on): B uniforms for the decision and B sigmas. A part that is off
    draws nothing."""
    jitter = factors = blur = sigma = None
    order: tuple[int, ...] = (0, 1, 2, 3)
    if settings.jitter:
        s = settings.jitter_strength
        jitter = torch.rand(batch, generator=generator, dtype=torch.float64) < settings.jitter_prob
        factors = torch.stack(
            [
                _uniform(batch, max(0.0, 1.0 - s), 1.0 + s, generator),
                _uniform(batch, max(0.0, 1.0 - s), 1.0 + s, generator),
                _uniform(batch, max(0.0, 1.0 - s), 1.0 + s, generator),
                _uniform(batch, -s, s, generator),
            ],
            dim=1,
        )
        order = tuple(int(i) for i in torch.randperm(4, generator=generator))
    if settings.blur:
        blur = torch.rand(batch, generator=generator, dtype=torch.float64) < settings.blur_prob
        sigma = _uniform(batch, settings.blur_sigma[0], settings.blur_sigma[1], generator)
    return StrongParams(jitter=jitter, factors=factors, order=order, blur=blur, sigma=sigma)


def _select(chosen: Tensor, changed: Tensor, original: Tensor) -> Tensor:
    return torch.where(chosen.to(original.device).reshape(-1, 1, 1, 1), changed, original)


def apply_strong(images: Tensor, norm: str, params: StrongParams) -> Tensor:
    """Apply drawn :class:`StrongParams` to normalised images (B x 3 x H x W); returns
    normalised images of the input's dtype. Images whose decisions are "no" come back as
    they went in (up to the normalisation round trip). The decisions live on the CPU, so
    a batch with nothing to do skips the work without asking the device."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be B x 3 x H x W, got shape {tuple(images.shape)}")
    rgb = to_unit_rgb(images, norm)
    if params.jitter is not None and params.factors is not None and bool(params.jitter.any()):
        rgb = _select(params.jitter, color_jitter(rgb, params.factors, params.order), rgb)
    if params.blur is not None and params.sigma is not None and bool(params.blur.any()):
        rgb = _select(params.blur, gaussian_blur(rgb, params.sigma), rgb)
    return from_unit_rgb(rgb, norm).to(images.dtype)


def strong_augment(
    images: Tensor, norm: str, generator: torch.Generator, settings: StrongAugment | None = None
) -> Tensor:
    """:func:`apply_strong` with :func:`draw_params` from ``generator`` (a CPU generator)."""
    params = draw_params(images.shape[0], generator, settings if settings is not None else StrongAugment())
    return apply_strong(images, norm, params)
