"""Rare-class sampling (RCS, DAFormer) of the source images.

1. **Class statistics.** Every source image's pixel count per class, at the resolution the
   dataset serves (its ``size``, before augmentation), counted once and cached as JSON
   beside the dataset (:func:`cached_class_pixels`). (DAFormer counts at the label file's
   native size; counting at the served size puts ``min_pixels`` on the same pixels as the
   crop rule below.)
2. **Class probabilities** (:func:`rcs_probabilities`): with ``f_c`` class c's share of all
   labelled pixels, ``P(c) = softmax_c((1 - f_c) / T)`` over the classes that at least one
   image holds with more than ``min_pixels`` pixels; every other class gets 0.
3. **The sampler** (:class:`RareClassSampler`): for every sample, draw a class from
   ``P``, then an image uniformly among those holding more than ``min_pixels`` pixels of it.
   Each draw depends only on ``(seed, global position)``, with the positions laid out as
   in :class:`~dast.training.sampler.StepSampler`, so resuming needs only the step.
4. **The crop rule** (:func:`first_acceptable`, :func:`rare_class_crop`,
   :class:`RareClassCrops`): a random crop of the sampled image is drawn again, up to 10
   times, until it holds more than ``min_crop_ratio * min_pixels`` pixels of the class.

Published values (DAFormer, Cityscapes scale): temperature 0.01, min_pixels 3000,
min_crop_ratio 0.5. DAFormer compares both pixel counts with a strict ``>``, as we do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from dast.atomic import write_json
from dast.data.datasets import SegmentationDataset
from dast.data.transforms import resize_label
from dast.errors import ConfigError, DataError, UserError
from dast.progress import progress
from dast.training.sampler import StepSampler

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_VERSION = 1
DEFAULT_TEMPERATURE = 0.01  # DAFormer rare_class_sampling.class_temp
DEFAULT_MIN_PIXELS = 3000  # DAFormer rare_class_sampling.min_pixels (Cityscapes scale)
DEFAULT_MIN_CROP_RATIO = 0.5  # DAFormer rare_class_sampling.min_crop_ratio
DEFAULT_ATTEMPTS = 10  # DAFormer re-draws the crop up to 10 times


# ---------------------------------------------------------------------------------------
# Class statistics


def label_class_pixels(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class ``0 .. num_classes - 1`` of one label map (other values ignored); int64."""
    flat = np.asarray(label).reshape(-1).astype(np.int64)
    counts = np.bincount(flat[(flat >= 0) & (flat < num_classes)], minlength=num_classes)
    return counts[:num_classes].astype(np.int64)


def served_label(dataset: SegmentationDataset, i: int) -> np.ndarray:
    """Image ``i``'s train-id label resized (nearest) to the dataset's ``size``, as the dataset
    serves it before augmentation (at the native size when ``size`` is None)."""
    return resize_label(dataset.read_label_native(i), dataset.size)


def class_pixel_counts(dataset: SegmentationDataset, *, workers: int = 1, show_progress: bool = True) -> np.ndarray:
    """``counts[i, c]``: pixels of class c in image i's label (see :func:`served_label`);
    N x C int64. An unreadable label fails, or counts as no pixels when the dataset's
    policy is ``on_corrupt: skip`` (that image is then never drawn)."""
    if not dataset.has_labels:
        raise DataError("rare-class sampling needs a labelled dataset (with_labels: true)")
    n, c = len(dataset), dataset.num_classes

    def count(i: int) -> np.ndarray:
        try:
            return label_class_pixels(served_label(dataset, i), c)
        except DataError as exc:
            if dataset.on_corrupt != "skip":
                raise
            log.warning("class statistics: skipping unreadable label of %s: %s", dataset.describe(i), exc)
            return np.zeros(c, np.int64)

    out = np.zeros((n, c), np.int64)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        rows = pool.map(count, range(n)) if workers > 1 else map(count, range(n))
        for i, row in enumerate(progress(rows, total=n, desc="class statistics", unit="img", enabled=show_progress)):
            out[i] = row
    return out


def cache_name(dataset: SegmentationDataset) -> str:
    """The cache file's name: ``dast_class_pixels_<kind>_<W>x<H>.json`` (``native`` without a size)."""
    size = f"{dataset.size[0]}x{dataset.size[1]}" if dataset.size is not None else "native"
    return f"dast_class_pixels_{dataset.kind}_{size}.json"


def _cache_header(dataset: SegmentationDataset) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION,
        "kind": dataset.kind,
        "size": list(dataset.size) if dataset.size is not None else None,
        "num_classes": dataset.num_classes,
        "names": list(dataset.names),
    }


def _read_cache(path: Path, header: dict[str, Any]) -> np.ndarray | None:
    """The cached counts if ``path`` holds counts for exactly this header, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in header.items()):
        return None
    try:
        counts = np.asarray(data["pixels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        return None
    if counts.shape != (len(header["names"]), header["num_classes"]):
        return None
    return counts


def cached_class_pixels(
    dataset: SegmentationDataset,
    root: str | os.PathLike[str] | None,
    fallback_dir: str | os.PathLike[str] | None = None,
    *,
    workers: int = 1,
    show_progress: bool = True,
) -> np.ndarray:
    """:func:`class_pixel_counts`, cached as :func:`cache_name` in ``root`` (the dataset's
    folder), or in ``fallback_dir`` when ``root`` is None or cannot be written.

    The cache is used only when it was made for the same kind, size, class count and image
    list (names in order); otherwise the counts are computed again and the file replaced.
    When neither folder can be written, the counts are returned uncached (a warning is
    logged). Writes are atomic, so ranks that compute at once leave one whole file.
    """
    header = _cache_header(dataset)
    folders = [Path(d) for d in (root, fallback_dir) if d is not None]
    for folder in folders:
        hit = _read_cache(folder / cache_name(dataset), header)
        if hit is not None:
            return hit
    counts = class_pixel_counts(dataset, workers=workers, show_progress=show_progress)
    payload = {**header, "pixels": counts.tolist()}
    for folder in folders:
        try:
            write_json(folder / cache_name(dataset), payload)
            return counts
        except (OSError, UserError) as exc:
            log.info("cannot cache class statistics in %s: %s", folder, exc)
    log.warning("class statistics not cached: no writable folder among %s", ", ".join(map(str, folders)) or "none")
    return counts


# ---------------------------------------------------------------------------------------
# Class probabilities


def eligible_images(class_pixels: np.ndarray | Tensor, min_pixels: int) -> list[np.ndarray]:
    """For each class c, the indices of the images with more than ``min_pixels`` pixels of c."""
    counts = np.asarray(class_pixels.cpu() if isinstance(class_pixels, Tensor) else class_pixels, dtype=np.int64)
    if counts.ndim != 2:
        raise ValueError(f"class pixel counts must be images x classes, got shape {counts.shape}")
    return [np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])]


def rcs_probabilities(class_pixels: np.ndarray | Tensor, temperature: float, min_pixels: int) -> Tensor:
    """DAFormer's class probabilities ``softmax_c((1 - f_c) / temperature)`` (float64, length C).

    ``f_c`` is class c's share of all labelled pixels (of every class, summed over the
    images); the softmax runs over the classes with at least one image holding more than
    ``min_pixels`` pixels of them, the others get probability 0. A lower temperature
    favours rare classes more (published: 0.01).
    """
    if temperature <= 0:
        raise ConfigError(f"the rare-class sampling temperature must be > 0, got {temperature}")
    counts = torch.as_tensor(np.asarray(class_pixels, dtype=np.int64)).double()
    if counts.dim() != 2:
        raise ValueError(f"class pixel counts must be images x classes, got shape {tuple(counts.shape)}")
    totals = counts.sum(dim=0)
    keep = torch.as_tensor([len(e) > 0 for e in eligible_images(class_pixels, min_pixels)], dtype=torch.bool)
    if not bool(keep.any()):
        raise ConfigError(
            f"rare-class sampling: no class has an image with more than min_pixels={min_pixels} pixels of it; "
            "lower min_pixels"
        )
    freq = totals / totals.sum()
    logits = torch.where(keep, (1.0 - freq) / float(temperature), torch.full_like(freq, -torch.inf))
    return torch.softmax(logits, dim=0)


@dataclass(frozen=True)
class RarePlan:
    """What the sampler draws from: class probabilities and each class's eligible images."""

    probabilities: Tensor  # float64, length C
    eligible: tuple[np.ndarray, ...]  # per class, image indices (empty where P(c) = 0)
    num_images: int

    @property
    def num_classes(self) -> int:
        return int(self.probabilities.numel())


def rcs_plan(class_pixels: np.ndarray | Tensor, temperature: float, min_pixels: int) -> RarePlan:
    """:func:`rcs_probabilities` and :func:`eligible_images` of one set of counts."""
    counts = np.asarray(class_pixels, dtype=np.int64)
    return RarePlan(
        probabilities=rcs_probabilities(counts, temperature, min_pixels),
        eligible=tuple(eligible_images(counts, min_pixels)),
        num_images=int(counts.shape[0]),
    )


# ---------------------------------------------------------------------------------------
# The sampler


def encode_index(image: int, cls: int, position: int, num_images: int, num_classes: int) -> int:
    """The dataset index the sampler yields: ``image + n * (cls + C * position)``.

    ``index % n`` is the image (what every dast dataset reads), ``(index // n) % C`` the
    sampled class, and the whole value is unique per global position, so it can seed the
    sample's augmentation."""
    return int(image) + num_images * (int(cls) + num_classes * int(position))


def decode_index(index: int, num_images: int, num_classes: int) -> tuple[int, int, int]:
    """(image, class, position) of an :func:`encode_index` value."""
    rest, image = divmod(int(index), num_images)
    position, cls = divmod(rest, num_classes)
    return image, cls, position


def draw_generator(seed: int, position: int) -> torch.Generator:
    """The CPU generator of global position ``position``: seeded by a hash of (seed, position)."""
    digest = hashlib.blake2b(f"dast-rcs:{int(seed)}:{int(position)}".encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") >> 1)
    return g


def rcs_draw(plan: RarePlan, seed: int, position: int) -> tuple[int, int]:
    """(class, image) for a global position: the class from ``plan.probabilities``, then an
    image uniformly among the class's eligible ones; a pure function of its arguments."""
    g = draw_generator(seed, position)
    cls = int(torch.multinomial(plan.probabilities, 1, generator=g))
    pool = plan.eligible[cls]
    return cls, int(pool[int(torch.randint(len(pool), (1,), generator=g))])


class RareClassSampler(Sampler[int]):
    """An infinite, resumable, distributed-aware sampler of rare-class draws.

    ``layout`` (a :class:`~dast.training.sampler.StepSampler` for the dataset's images) says
    which global positions this rank takes at each step, from its start step on; position
    ``p`` yields :func:`encode_index` of :func:`rcs_draw` ``(plan, layout.seed, p)``. So the
    sequence depends only on (seed, step, rank, world size), N ranks see the data of one
    process with batch N * B, and a resumed run only needs the start step.
    """

    def __init__(self, plan: RarePlan, layout: StepSampler) -> None:
        if layout.n != plan.num_images:
            raise ValueError(f"the layout is for {layout.n} images, the plan for {plan.num_images}")
        self.plan, self.layout = plan, layout

    def __iter__(self) -> Iterator[int]:
        n, c = self.plan.num_images, self.plan.num_classes
        for pos in self.layout.positions():
            cls, image = rcs_draw(self.plan, self.layout.seed, pos)
            yield encode_index(image, cls, pos, n, c)

    def __len__(self) -> int:  # an infinite sampler, like StepSampler
        return 2**62


# ---------------------------------------------------------------------------------------
# The crop rule


def first_acceptable(
    propose: Callable[[int], T], class_pixels: Callable[[T], int], need: float, attempts: int = DEFAULT_ATTEMPTS
) -> tuple[T, int]:
    """Call ``propose(0), propose(1), ...`` until a proposal has ``class_pixels(p) > need``;
    returns (that proposal, its attempt number). After ``attempts`` proposals without one,
    the last is returned (DAFormer likewise keeps its last draw)."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    proposal = propose(0)
    for a in range(attempts):
        if a > 0:
            proposal = propose(a)
        if class_pixels(proposal) > need:
            return proposal, a
    return proposal, attempts - 1


Box = tuple[int, int, int, int]  # (top, left, height, width)


def rare_class_crop(
    label: np.ndarray,
    cls: int,
    propose: Callable[[int], Box],
    min_pixels: int = DEFAULT_MIN_PIXELS,
    min_crop_ratio: float = DEFAULT_MIN_CROP_RATIO,
    attempts: int = DEFAULT_ATTEMPTS,
) -> Box:
    """The first crop box ``propose(a)`` = (top, left, height, width) of ``label`` holding more
    than ``min_crop_ratio * min_pixels`` pixels of class ``cls`` (else the last of
    ``attempts`` boxes)."""

    def pixels(box: Box) -> int:
        top, left, h, w = box
        return int(np.count_nonzero(label[top : top + h, left : left + w] == cls))

    return first_acceptable(propose, pixels, min_crop_ratio * min_pixels, attempts)[0]


class RareClassCrops(Dataset):
    """A source dataset read through :class:`RareClassSampler` indices, with the crop rule.

    ``dataset[i]`` decodes ``i`` (:func:`decode_index`) into the image and the sampled class,
    and reads the image through ``base`` with up to ``attempts`` different augmentation
    draws (base index ``image + n * (position * attempts + a)``) until the item's label holds
    more than ``min_crop_ratio * min_pixels`` pixels of the class. When ``base`` has no
    random scale or crop, one draw is made (every draw would be the same). The item gains
    ``"rcs_class"``: the sampled class.
    """

    def __init__(
        self,
        base: SegmentationDataset,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        min_crop_ratio: float = DEFAULT_MIN_CROP_RATIO,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        if not base.has_labels:
            raise DataError("rare-class sampling needs a labelled dataset (with_labels: true)")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.base = base
        self.min_pixels = int(min_pixels)
        self.min_crop_ratio = float(min_crop_ratio)
        self.attempts = int(attempts)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.base)
        image, cls, position = decode_index(i, n, self.num_classes)
        aug = self.base.augment
        random_geometry = aug.crop is not None or aug.scale is not None
        tries = self.attempts if (random_geometry and self.min_crop_ratio > 0) else 1

        def propose(a: int) -> dict[str, Any]:
            return self.base[image + n * (position * self.attempts + a)]

        def pixels(item: dict[str, Any]) -> int:
            return int((item["label"] == cls).sum())

        item, _ = first_acceptable(propose, pixels, self.min_crop_ratio * self.min_pixels, tries)
        return {**item, "rcs_class": cls}
