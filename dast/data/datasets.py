"""Segmentation datasets: GTA5, SYNTHIA, Cityscapes, custom folders and the demo domains.

A dataset is a list of named samples read from a *source* (files on disk, the synthetic
generator, or images paired with a folder of pseudo labels). Item ``i`` is sample
``i % len``, so a sampler can encode the epoch in the index; the random augmentation of
item ``i`` depends only on ``(seed, i)``, never on the worker process that loads it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dast.atomic import write_with
from dast.config import AugmentConfig, DatasetConfig
from dast.constants import IGNORE_INDEX
from dast.data.labels import ClassTable, table_for
from dast.data.readers import label_reader, read_image, read_index_label
from dast.data.synthetic import generate_scene, scene_stem
from dast.data.transforms import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    jitter_factor,
    normalize,
    resize_image,
    resize_label,
    to_grayscale,
)
from dast.errors import ConfigError, DataError
from dast.rundir import PL_STATS

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit"
CITYSCAPES_LABEL_SUFFIX = "_gtFine_labelIds"
FILE_KINDS = ("gta5", "synthia", "cityscapes", "folder")


# ---------------------------------------------------------------------------------------
# On-disk layouts


@dataclass(frozen=True)
class Layout:
    """Where the images and labels of a file-based dataset live, and how they pair up."""

    kind: str
    root: Path
    image_dir: Path
    label_dir: Path | None

    def _nested(self) -> bool:
        return self.kind == "cityscapes"

    def image_files(self) -> list[tuple[str, Path]]:
        """(name, path) of every image, sorted by name (duplicates are kept)."""
        if self._nested():
            files = self.image_dir.glob(f"*/*{CITYSCAPES_IMAGE_SUFFIX}.png")
            pairs = [(p.name[: -len(CITYSCAPES_IMAGE_SUFFIX) - 4], p) for p in files if p.is_file()]
        else:
            exts = IMAGE_EXTS if self.kind == "folder" else (".png",)
            pairs = [(p.stem, p) for p in self.image_dir.iterdir() if p.is_file() and p.suffix.lower() in exts]
        return sorted(pairs, key=lambda t: (t[0], str(t[1])))

    def label_files(self) -> list[tuple[str, Path]]:
        """(name, path) of every label file, sorted by name."""
        if self.label_dir is None or not self.label_dir.is_dir():
            return []
        if self._nested():
            files = self.label_dir.glob(f"*/*{CITYSCAPES_LABEL_SUFFIX}.png")
            pairs = [(p.name[: -len(CITYSCAPES_LABEL_SUFFIX) - 4], p) for p in files if p.is_file()]
        else:
            pairs = [(p.stem, p) for p in self.label_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"]
        return sorted(pairs, key=lambda t: (t[0], str(t[1])))

    def label_path(self, name: str, image_path: Path) -> Path | None:
        """The label file that belongs to an image (it may not exist)."""
        if self.label_dir is None:
            return None
        if self._nested():
            return self.label_dir / image_path.parent.name / f"{name}{CITYSCAPES_LABEL_SUFFIX}.png"
        return self.label_dir / f"{name}.png"


def layout_for(
    kind: str, root: str | Path, split: str = "train", images: str = "images", labels: str | None = "labels"
) -> Layout:
    """The layout of a dataset kind under ``root`` (``images``/``labels`` are for folders)."""
    r = Path(root)
    if kind == "gta5":
        return Layout(kind, r, r / "images", r / "labels")
    if kind == "synthia":
        return Layout(kind, r, r / "RGB", r / "GT" / "LABELS")
    if kind == "cityscapes":
        return Layout(kind, r, r / "leftImg8bit" / split, r / "gtFine" / split)
    if kind == "folder":
        return Layout(kind, r, r / images, (r / labels) if labels else None)
    raise ConfigError(f"dataset kind {kind!r} has no files on disk (file kinds: {', '.join(FILE_KINDS)})")


def entry_to_name(entry: str) -> str:
    """A list-file entry (stem, relative path, or ``city/x_leftImg8bit.png``) -> sample name."""
    base = PurePosixPath(entry.strip().replace("\\", "/")).name
    if Path(base).suffix.lower() in IMAGE_EXTS:
        base = base[: -len(Path(base).suffix)]
    for suffix in (CITYSCAPES_IMAGE_SUFFIX, CITYSCAPES_LABEL_SUFFIX):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def read_list_file(path: str | Path) -> list[tuple[int, str, str]]:
    """(line number, entry, sample name) of each entry; blank lines and '#' comments are skipped.

    Only the first whitespace-separated field of a line is used, so "image label" pair
    lists work too.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"list file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read list file {p}: {exc}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        entry = s.split()[0]
        out.append((lineno, entry, entry_to_name(entry)))
    return out


# ---------------------------------------------------------------------------------------
# Sample sources


class Source(Protocol):
    """Where the pixels of sample ``j`` come from."""

    def image(self, j: int) -> np.ndarray: ...

    def label(self, j: int) -> np.ndarray: ...

    def pair(self, j: int, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]: ...

    def describe(self, j: int) -> str: ...


class FileSource:
    """Images (and labels) read from files."""

    def __init__(
        self, images: Sequence[Path], labels: Sequence[Path | None], reader: Callable[[Path], np.ndarray] | None
    ) -> None:
        self.images = list(images)
        self.labels = list(labels)
        self.reader = reader

    def image(self, j: int) -> np.ndarray:
        return read_image(self.images[j])

    def label(self, j: int) -> np.ndarray:
        path = self.labels[j] if j < len(self.labels) else None
        if path is None or self.reader is None:
            raise DataError(f"no label file for image {self.images[j]}")
        return self.reader(path)

    def pair(self, j: int, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return self.image(j), (self.label(j) if with_label else None)

    def describe(self, j: int) -> str:
        return str(self.images[j])


class SyntheticSource:
    """Scenes of the procedurally generated demo domains (nothing is read from disk)."""

    CACHE_LIMIT = 4096  # scenes kept in memory (a few MB at demo sizes)

    def __init__(self, domain: str, seed: int, size: tuple[int, int], shift: str = "appearance") -> None:
        self.domain = domain
        self.seed = seed
        self.size = size
        self.shift = shift
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def pair(self, j: int, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
        hit = self._cache.get(j)
        if hit is None:
            rgb, label = generate_scene(self.domain, j, self.seed, self.size, self.shift)
            hit = (np.array(rgb, np.uint8), np.array(label, np.uint8))
            for arr in hit:
                arr.setflags(write=False)  # shared by every later read
            if len(self._cache) < self.CACHE_LIMIT:
                self._cache[j] = hit
        return hit[0], (hit[1] if with_label else None)

    def image(self, j: int) -> np.ndarray:
        return self.pair(j, False)[0]

    def label(self, j: int) -> np.ndarray:
        label = self.pair(j, True)[1]
        assert label is not None
        return label

    def describe(self, j: int) -> str:
        return f"synthetic {self.domain} scene {j}"


class LabelDirSource:
    """Another source's images paired with ``<label_dir>/<name>.png`` class-index labels."""

    def __init__(self, base: Source, label_dir: Path, names: Sequence[str], num_classes: int) -> None:
        self.base = base
        self.label_dir = label_dir
        self.names = list(names)
        self.num_classes = num_classes

    def image(self, j: int) -> np.ndarray:
        return self.base.image(j)

    def label(self, j: int) -> np.ndarray:
        return read_index_label(self.label_dir / f"{self.names[j]}.png", self.num_classes)

    def pair(self, j: int, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return self.image(j), (self.label(j) if with_label else None)

    def describe(self, j: int) -> str:
        return self.base.describe(j)


# ---------------------------------------------------------------------------------------
# Augmentation (pure functions of the arrays and a generator)


def augment_pair(
    rgb: np.ndarray, label: np.ndarray | None, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random scale, then crop (padding with 0 / 255 where needed), then horizontal flip,
    then the photometric changes of :func:`photometric_augment` (image only)."""
    if aug.scale is not None:
        s = float(rng.uniform(aug.scale[0], aug.scale[1]))
        h, w = rgb.shape[:2]
        new = (max(1, int(round(w * s))), max(1, int(round(h * s))))
        rgb = resize_image(rgb, new)
        if label is not None:
            label = resize_label(label, new)
    if aug.crop is not None:
        cw, ch = int(aug.crop[0]), int(aug.crop[1])
        h, w = rgb.shape[:2]
        if h < ch or w < cw:
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=0)
            if label is not None:
                label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
            h, w = rgb.shape[:2]
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        rgb = rgb[y0 : y0 + ch, x0 : x0 + cw]
        if label is not None:
            label = label[y0 : y0 + ch, x0 : x0 + cw]
    if aug.flip and rng.random() < 0.5:
        rgb = rgb[:, ::-1]
        if label is not None:
            label = label[:, ::-1]
    rgb = photometric_augment(np.ascontiguousarray(rgb), aug, rng)
    return rgb, (np.ascontiguousarray(label) if label is not None else None)


def photometric_augment(rgb: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter, then grayscale, then Gaussian blur,
    each only when switched on. Nothing is drawn from ``rng`` for an operation that is off,
    so turning these on leaves the geometric draws (made before) unchanged."""
    if aug.brightness > 0:
        rgb = adjust_brightness(rgb, jitter_factor(rng, aug.brightness))
    if aug.contrast > 0:
        rgb = adjust_contrast(rgb, jitter_factor(rng, aug.contrast))
    if aug.saturation > 0:
        rgb = adjust_saturation(rgb, jitter_factor(rng, aug.saturation))
    if aug.hue > 0:
        rgb = adjust_hue(rgb, float(rng.uniform(-aug.hue, aug.hue)))
    if aug.grayscale_prob > 0 and rng.random() < aug.grayscale_prob:
        rgb = to_grayscale(rgb)
    if aug.blur_prob > 0 and rng.random() < aug.blur_prob:
        rgb = gaussian_blur(rgb, float(rng.uniform(aug.blur_sigma[0], aug.blur_sigma[1])))
    return rgb


def _photometric_enabled(aug: AugmentConfig) -> bool:
    return bool(aug.brightness or aug.contrast or aug.saturation or aug.hue or aug.blur_prob or aug.grayscale_prob)


def _augment_enabled(aug: AugmentConfig) -> bool:
    return bool(aug.flip or aug.scale is not None or aug.crop is not None or _photometric_enabled(aug))


# ---------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True, kw_only=True)
class SamplePrep:
    """How a dataset prepares its samples: the size images are resized to (width, height;
    None: as stored), the input normalisation, the augmentation, what an unreadable sample
    does (``fail`` or ``skip``) and the seed of the augmentation draws."""

    size: tuple[int, int] | None
    norm: str
    augment: AugmentConfig | None = None
    on_corrupt: str = "fail"
    seed: int = 0


class SegmentationDataset(Dataset):
    """Images (resized to ``prep.size``, normalised with ``prep.norm``) and train-id labels.

    ``dataset[i]`` is ``{"image": 3xHxW float, "label": HxW long (when has_labels),
    "name": str, "index": int}`` for sample ``i % len(dataset)``.
    """

    def __init__(
        self,
        source: Source,
        *,
        names: Sequence[str],
        table: ClassTable,
        kind: str,
        has_labels: bool,
        prep: SamplePrep,
    ) -> None:
        if not names:
            raise DataError("the dataset is empty")
        self.source = source
        self.names: list[str] = list(names)
        self.table = table
        self.kind = kind
        self.has_labels = has_labels
        self.prep = prep
        size = prep.size
        self.size: tuple[int, int] | None = (int(size[0]), int(size[1])) if size is not None else None
        self.norm = prep.norm
        self.augment = prep.augment if prep.augment is not None else AugmentConfig()
        self.on_corrupt = prep.on_corrupt
        self.seed = int(prep.seed)

    @property
    def num_classes(self) -> int:
        return self.table.num_classes

    def __len__(self) -> int:
        return len(self.names)

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            raise IndexError(f"dataset index must be non-negative, got {i}")
        return i % len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample ``i``; under ``on_corrupt: skip`` an unreadable one is replaced by the next
        readable sample (its augmentation still drawn for ``i``)."""
        j = self._index(i)
        n = len(self.names)
        for attempt in range(n if self.on_corrupt == "skip" else 1):
            item = self.item_or_none((j + attempt) % n, draw=int(i))
            if item is not None:
                return item
        raise DataError(f"no readable sample left in the {self.kind} dataset ({n} samples tried)")

    def item_or_none(self, i: int, draw: int | None = None, augment: bool = True) -> dict[str, Any] | None:
        """Sample ``i`` itself, never a stand-in: None if it cannot be read and the policy is
        ``on_corrupt: skip`` (logged); with ``fail`` the DataError propagates. ``draw`` (default
        ``i``) seeds the augmentation; ``augment=False`` skips it (pseudo-labelling and
        evaluation see the images as they are)."""
        j = self._index(i)
        try:
            d = int(i) if draw is None else draw
            return self._item(j, d) if augment else self._item(j, d, augment=False)
        except DataError as exc:
            if self.on_corrupt != "skip":
                raise
            log.warning("skipping unreadable sample %s (%s): %s", self.names[j], self.source.describe(j), exc)
            return None

    def _item(self, k: int, i: int, augment: bool = True) -> dict[str, Any]:
        rgb, label = self.source.pair(k, self.has_labels)
        rgb = resize_image(rgb, self.size)
        if label is not None:
            label = resize_label(label, (rgb.shape[1], rgb.shape[0]))
        if augment and _augment_enabled(self.augment):
            rgb, label = augment_pair(rgb, label, self.augment, np.random.default_rng([self.seed, i]))
        out: dict[str, Any] = {"image": normalize(rgb, self.norm), "name": self.names[k], "index": k}
        if label is not None:
            out["label"] = torch.from_numpy(label.astype(np.int64))
        return out

    def read_image_rgb(self, i: int) -> np.ndarray:
        """Sample ``i``'s image as H x W x 3 uint8 RGB, resized to ``size`` (no augmentation)."""
        return resize_image(self.source.image(self._index(i)), self.size)

    def prepare_image(self, i: int) -> torch.Tensor:
        """Sample ``i``'s network input: resized and normalised, without augmentation."""
        return normalize(self.read_image_rgb(i), self.norm)

    def read_label_native(self, i: int) -> np.ndarray:
        """Sample ``i``'s train-id label at its native resolution (for evaluation)."""
        return self.source.label(self._index(i))

    def describe(self, i: int) -> str:
        """Where sample ``i`` comes from (a file path for file datasets)."""
        return self.source.describe(self._index(i))


# ---------------------------------------------------------------------------------------
# Construction


def select_by_list(found: Sequence[tuple[str, Path]], list_file: str | Path, where: Path) -> list[tuple[str, Path]]:
    """Restrict and order ``found`` by a list file; an unknown entry is a DataError."""
    index: dict[str, Path] = {}
    for name, path in found:
        index.setdefault(name, path)
    out = []
    for lineno, entry, name in read_list_file(list_file):
        if name not in index:
            raise DataError(f"{list_file}:{lineno}: '{entry}' has no image in {where}")
        out.append((name, index[name]))
    if not out:
        raise DataError(f"list file {list_file} names no images")
    return out


def _check_unique(found: Sequence[tuple[str, Path]]) -> None:
    seen: dict[str, Path] = {}
    for name, path in found:
        if name in seen:
            raise DataError(f"two images share the name '{name}': {seen[name]} and {path}")
        seen[name] = path


def _file_samples(cfg: DatasetConfig, want_labels: bool) -> tuple[list[str], list[Path], list[Path | None]]:
    if cfg.root is None:
        raise ConfigError(f"a {cfg.kind} dataset needs 'root' (the folder that holds it)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    layout = layout_for(cfg.kind, root, cfg.split, cfg.images, cfg.labels)
    if not layout.image_dir.is_dir():
        raise DataError(f"image folder not found: {layout.image_dir}")
    found = layout.image_files()
    if not found:
        raise DataError(f"no images found in {layout.image_dir}")
    _check_unique(found)
    if cfg.list_file:
        found = select_by_list(found, cfg.list_file, layout.image_dir)
    names = [n for n, _ in found]
    images = [p for _, p in found]
    labels: list[Path | None] = [None] * len(found)
    if want_labels:
        if layout.label_dir is None or not layout.label_dir.is_dir():
            shown = layout.label_dir if layout.label_dir is not None else f"{root} (no label folder configured)"
            raise DataError(f"label folder not found: {shown}; use the images without labels (with_labels: false)")
        labels = [layout.label_path(n, p) for n, p in found]
        missing = [(img, lab) for img, lab in zip(images, labels) if lab is None or not lab.is_file()]
        if missing:
            more = f" ({len(missing) - 1} more images lack labels)" if len(missing) > 1 else ""
            raise DataError(f"image {missing[0][0]} has no label file {missing[0][1]}{more}")
    return names, images, labels


def build_dataset(
    cfg: DatasetConfig, *, norm: str, num_classes: int, with_labels: bool | None = None, seed: int = 0
) -> SegmentationDataset:
    """Build the dataset a config describes (``with_labels`` None -> ``cfg.with_labels``)."""
    if cfg.kind in FILE_KINDS and cfg.root is not None and not Path(cfg.root).is_dir():
        raise DataError(f"dataset root not found: {cfg.root}")  # before asking it for a class list
    table = table_for(cfg, num_classes)
    want = cfg.with_labels if with_labels is None else bool(with_labels)
    prep = SamplePrep(size=cfg.size, norm=norm, augment=cfg.augment, on_corrupt=cfg.on_corrupt, seed=seed)
    common: dict[str, Any] = dict(table=table, kind=cfg.kind, has_labels=want, prep=prep)
    if cfg.kind == "synthetic":
        if cfg.size is None:
            raise ConfigError("a synthetic dataset needs 'size' (width, height) for its generated scenes")
        names = [scene_stem(cfg.domain, k) for k in range(cfg.count)]
        return SegmentationDataset(SyntheticSource(cfg.domain, seed, cfg.size, cfg.shift), names=names, **common)
    names, images, labels = _file_samples(cfg, want)
    reader = label_reader(cfg.kind, table.num_classes) if want else None
    return SegmentationDataset(FileSource(images, labels, reader), names=names, **common)


def require_named_pngs(folder: str | Path, names: Sequence[str], what: str, may_lack: Sequence[str] = ()) -> Path:
    """``folder`` as a Path, after checking that it holds ``<name>.png`` for every name not in
    ``may_lack``; otherwise a DataError naming the folder or the first missing file
    (``what``: e.g. "prediction")."""
    d = Path(folder)
    if not d.is_dir():
        raise DataError(f"{what} folder not found: {d}")
    excused = set(may_lack)
    missing = [n for n in names if n not in excused and not (d / f"{n}.png").is_file()]
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(f"{what} missing: {d / (missing[0] + '.png')}{more}")
    return d


def with_label_dir(base: SegmentationDataset, label_dir: str | Path) -> SegmentationDataset:
    """``base``'s images paired with pseudo labels ``<label_dir>/<name>.png`` (train ids, 255 ignore).

    With ``on_corrupt: skip``, the images that pseudo-labelling could not read (``skipped`` in
    the folder's ``stats.json``) have no label; reading one fails and the sample is skipped."""
    may_lack: list[str] = []
    stats = Path(label_dir) / PL_STATS
    if base.on_corrupt == "skip" and stats.is_file():
        try:
            may_lack = [str(n) for n in json.loads(stats.read_text()).get("skipped", [])]
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(f"cannot read {stats}: {exc}") from None
    d = require_named_pngs(label_dir, base.names, "pseudo label", may_lack)
    source = LabelDirSource(base.source, d, base.names, base.num_classes)
    return SegmentationDataset(
        source, names=base.names, table=base.table, kind=base.kind, has_labels=True, prep=base.prep
    )


def save_label_png(path: str | Path, label: np.ndarray, table: ClassTable | None = None) -> None:
    """Write a train-id label as a PNG (palette-coloured when a table is given), atomically."""
    img = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    if table is not None:  # turns the 'L' image into a 'P' image with the same values
        img.putpalette(table.palette())
    write_with(path, lambda tmp: img.save(tmp, format="PNG"))
