"""Colour label images -> single-channel class-index labels (``dast convert labels``).

Many tools save segmentation labels as colour pictures: each class painted in its own
RGB colour. dast's ``folder`` datasets want single-channel PNGs of class indices
(``0 .. N-1``, ``255`` = ignore). The class list (``classes.yaml``: ``{name, color}``
entries in index order) says which colour is which index.

Contracts:

* Every pixel's colour must be a class colour or one of the ``ignore`` colours (which
  become 255). Every file is read; any other colour stops the conversion with one
  :class:`UnknownColours` line that lists every such colour, with its pixel count and the
  files that hold it.
* Nothing is half-written: the labels are written into a temporary sibling of the
  output folder, which is renamed into place only after every file converted. An
  existing non-empty output folder is refused unless ``force`` (which replaces it).
* RGB, palette (``P``) and RGBA PNGs with a fully opaque alpha channel are accepted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dast.atomic import TMP_MARK
from dast.constants import IGNORE_INDEX
from dast.data.labels import ClassTable
from dast.errors import ConfigError, DataError, UserError
from dast.progress import progress as report_progress

RGB = tuple[int, int, int]


def parse_rgb(text: str) -> RGB:
    """``"12,34,56"`` -> ``(12, 34, 56)``; a ValueError names what is wrong."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected R,G,B (three whole numbers), got {text!r}") from None
    if len(values) != 3 or any(not 0 <= v <= 255 for v in values):
        raise ValueError(f"expected R,G,B with three values in 0..255, got {text!r}")
    return values


def encode_rgb(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> H x W int32 codes ``R << 16 | G << 8 | B``."""
    a = np.asarray(rgb)
    return (a[..., 0].astype(np.int32) << 16) | (a[..., 1].astype(np.int32) << 8) | a[..., 2].astype(np.int32)


def _decode(code: int) -> RGB:
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


@dataclass(frozen=True)
class ColourLookup:
    """Sorted colour codes and the label value (class index or 255) of each."""

    codes: np.ndarray  # (K,) int32, sorted
    values: np.ndarray  # (K,) uint8
    num_classes: int


def colour_lookup(
    table: ClassTable, ignore: Iterable[Sequence[int]] = (), source: str = "the class list"
) -> ColourLookup:
    """The colour -> label map of a class table plus ignore colours.

    Two classes with one colour, or an ignore colour that is a class colour, cannot be
    told apart in a colour label: both are a :class:`ConfigError`.
    """
    owner: dict[int, str] = {}
    codes: list[int] = []
    values: list[int] = []
    for index, (name, colour) in enumerate(zip(table.names, table.colors)):
        code = int(encode_rgb(np.array(colour, np.uint8)))
        if code in owner:
            raise ConfigError(
                f"{source}: classes '{owner[code]}' and '{name}' share the colour {tuple(colour)}; "
                "colour labels cannot tell them apart"
            )
        owner[code] = name
        codes.append(code)
        values.append(index)
    ignored: set[int] = set()
    for ignore_colour in ignore:
        rgb = tuple(int(v) for v in ignore_colour)
        code = int(encode_rgb(np.array(rgb, np.uint8)))
        if code in owner:
            raise ConfigError(f"ignore colour {rgb} is the colour of class '{owner[code]}' in {source}")
        if code not in ignored:
            ignored.add(code)
            codes.append(code)
            values.append(IGNORE_INDEX)
    order = np.argsort(np.array(codes, np.int64), kind="stable")
    return ColourLookup(np.array(codes, np.int32)[order], np.array(values, np.uint8)[order], table.num_classes)


class UnknownColours(DataError):
    """Colour labels hold colours that are neither a class nor an ignore colour.

    ``found`` maps each file to its unknown colours and their pixel counts; the message
    lists every colour, the most frequent first, with its pixels and files."""

    SHOWN = 12  # colours listed by name; the rest are counted

    def __init__(self, found: dict[str, dict[RGB, int]], hint_source: str) -> None:
        self.found, self.hint_source = found, hint_source
        super().__init__(self._message())

    def _message(self) -> str:
        pixels: dict[RGB, int] = {}
        files: dict[RGB, list[str]] = {}
        for where, colours in self.found.items():
            for rgb, n in colours.items():
                pixels[rgb] = pixels.get(rgb, 0) + n
                files.setdefault(rgb, []).append(where)
        order = sorted(pixels, key=lambda c: (-pixels[c], c))
        shown = order[: self.SHOWN]
        listed = "; ".join(f"{c} {_pixels(pixels[c])} in {_files(files[c])}" for c in shown)
        rest = order[self.SHOWN :]
        if rest:
            listed += (
                f"; and {len(rest)} more colours ({_pixels(sum(pixels[c] for c in rest))}; many rare colours "
                "usually mean anti-aliased or JPEG-compressed labels)"
            )
        flags = " ".join(f"--ignore-color {r},{g},{b}" for r, g, b in shown)
        what = "colour" if len(order) == 1 else f"{len(order)} colours"
        return (
            f"{what} not in {self.hint_source}: {listed}; add {'it' if len(order) == 1 else 'them'} "
            f"to {self.hint_source} or pass {flags}"
        )


def _files(names: list[str]) -> str:
    if len(names) <= 2:
        return " and ".join(names)
    return f"{len(names)} files ({names[0]}, {names[1]}, ...)"


def unknown_colours(rgb: np.ndarray, lookup: ColourLookup) -> dict[RGB, int]:
    """The colours of an H x W x 3 label that are neither a class nor an ignore colour, with
    their pixel counts."""
    codes = encode_rgb(rgb)
    pos = np.minimum(np.searchsorted(lookup.codes, codes), len(lookup.codes) - 1)
    known = lookup.codes[pos] == codes
    if known.all():
        return {}
    values, counts = np.unique(codes[~known], return_counts=True)
    return {_decode(int(v)): int(n) for v, n in zip(values, counts)}


def colours_to_index(
    rgb: np.ndarray, lookup: ColourLookup, where: str, hint_source: str = "the class list"
) -> np.ndarray:
    """Map an H x W x 3 colour label to an H x W uint8 index label.

    Colours that are neither a class nor an ignore colour are an :class:`UnknownColours`
    naming ``where``, every such colour and its pixel count.
    """
    unknown = unknown_colours(rgb, lookup)
    if unknown:
        raise UnknownColours({where: unknown}, hint_source)
    codes = encode_rgb(rgb)
    return lookup.values[np.minimum(np.searchsorted(lookup.codes, codes), len(lookup.codes) - 1)]


def _pixels(n: int) -> str:
    return f"{n} pixel{'s' if n != 1 else ''}"


def read_colour_label(path: Path) -> np.ndarray:
    """Read a colour label PNG as H x W x 3 uint8 RGB (RGB, palette, or opaque RGBA)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "RGBA":
                arr = np.asarray(img)
                transparent = int((arr[..., 3] != 255).sum())
                if transparent:
                    raise DataError(f"{path} has {_pixels(transparent)} with alpha < 255; colour labels must be opaque")
                return np.ascontiguousarray(arr[..., :3])
            if mode in ("RGB", "P"):
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        reason = str(exc).strip().splitlines()
        raise DataError(f"cannot read label {path}: {reason[0] if reason else type(exc).__name__}") from None
    if mode in ("L", "I", "I;16", "1"):
        raise DataError(
            f"{path} is a single-channel image (mode {mode}), not a colour label; it may already hold class indices"
        )
    raise DataError(f"{path}: unsupported image mode {mode} for a colour label (expected RGB, palette or RGBA)")


def convert_label_file(src: Path, dst: Path, lookup: ColourLookup, hint_source: str = "the class list") -> np.ndarray:
    """Convert one colour label PNG into an index PNG at ``dst``; returns the per-label
    pixel counts (``num_classes`` classes, then the ignored pixels)."""
    index = colours_to_index(read_colour_label(src), lookup, str(src), hint_source)
    Image.fromarray(index).save(dst, format="PNG")  # a 2-D uint8 array is a mode 'L' image
    counts = np.bincount(index.ravel(), minlength=256)
    return np.concatenate([counts[: lookup.num_classes], counts[IGNORE_INDEX:]]).astype(np.int64)


@dataclass(frozen=True)
class LabelConversion:
    """What :func:`convert_label_folder` wrote."""

    out_dir: Path
    files: int
    pixels: np.ndarray  # (num_classes,) pixels per class
    ignored: int  # pixels set to 255


def label_files(in_dir: Path) -> list[Path]:
    """The ``.png`` files directly in ``in_dir``, sorted by name."""
    return sorted((p for p in in_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"), key=lambda p: p.name)


def _check_folders(in_dir: Path, out_dir: Path, force: bool) -> None:
    if not in_dir.is_dir():
        raise UserError(f"label folder not found: {in_dir}" if not in_dir.exists() else f"not a folder: {in_dir}")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if src == dst:
        raise UserError(f"--out must differ from --in ({in_dir}); write the index labels into a new folder")
    if dst in src.parents:
        raise UserError(f"--out {out_dir} contains --in {in_dir}; choose an output folder outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"output folder {out_dir} is not empty; pass --force to replace it")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` folder onto ``out_dir`` (replacing an old one)."""
    old: Path | None = None
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}{TMP_MARK}old-{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_label_folder(
    table: ClassTable,
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    ignore: Iterable[Sequence[int]] = (),
    force: bool = False,
    classes_name: str = "the class list",
    workers: int | None = None,
    progress: bool = True,
) -> LabelConversion:
    """Convert every colour label PNG in ``in_dir`` into an index PNG of the same name in
    ``out_dir`` (see the module docstring for the guarantees)."""
    src, dst = Path(in_dir), Path(out_dir)
    _check_folders(src, dst, force)
    files = label_files(src)
    if not files:
        raise UserError(f"no .png label files in {src}")
    lookup = colour_lookup(table, ignore, classes_name)
    made = [p for p in (dst.absolute(), *dst.absolute().parents) if not p.exists()][1:]  # missing parents
    tmp = dst.with_name(f"{dst.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = np.zeros(table.num_classes + 1, np.int64)
    n_workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    unknown: dict[str, dict[RGB, int]] = {}

    def convert(path: Path) -> np.ndarray | None:
        try:
            return convert_label_file(path, tmp / path.name, lookup, classes_name)
        except UnknownColours as exc:  # every file is read: the error lists all the colours at once
            unknown.update(exc.found)
            return None

    try:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            try:
                done = pool.map(convert, files)
                for counts in report_progress(done, total=len(files), desc="converting labels", enabled=progress):
                    if counts is not None:
                        total += counts
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        if unknown:
            raise UnknownColours({k: unknown[k] for k in sorted(unknown)}, classes_name)
        _swap_into_place(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        for folder in made:  # deepest first: the parents created for the output, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return LabelConversion(dst, len(files), total[:-1], int(total[-1]))
