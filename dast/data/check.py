"""Check a dataset on disk and list every problem in one pass."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dast.config import DatasetConfig
from dast.data.datasets import IMAGE_EXTS, Layout, layout_for, read_list_file
from dast.data.labels import SYNTHIA_MAX_ID, read_class_file
from dast.data.readers import label_reader, read_image, read_synthia_ids
from dast.errors import DataError, UserError
from dast.progress import progress as report_progress


@dataclass
class CheckResult:
    """The problems found and how many files were looked at."""

    problems: list[str] = field(default_factory=list)
    num_images: int = 0
    num_labels: int = 0


def missing_root_message(root: Path, what: str) -> str:
    """The line for a dataset root that is missing or not a folder: the path as given, which
    setting gave it (``what``, e.g. "the target dataset's 'target.root'") and, for a relative
    path, where relative roots start and the absolute path."""
    problem = "not found" if not root.exists() else "is not a directory"
    where = what if root.is_absolute() else f"{what}; relative roots start at the working directory: {root.absolute()}"
    return f"dataset root {problem}: {root} ({where})"


def _read_synthia_checked(path: Path) -> np.ndarray:
    ids = read_synthia_ids(path)
    if int(ids.max(initial=0)) > SYNTHIA_MAX_ID:
        bad = np.unique(ids[ids > SYNTHIA_MAX_ID])
        shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise DataError(f"label {path} has value(s) {shown} outside 0..{SYNTHIA_MAX_ID}")
    return ids


def _label_checker(kind: str, root: Path, num_classes: int | None) -> Callable[[Path], np.ndarray]:
    if kind == "synthia":
        return _read_synthia_checked
    if kind == "folder":
        if num_classes is None and (root / "classes.yaml").is_file():
            num_classes = read_class_file(root / "classes.yaml").num_classes
        return label_reader("folder", num_classes if num_classes is not None else 255)
    return label_reader(kind, 19)


def colour_label_hint(path: Path, label_dir: Path, classes: str | Path | None) -> str | None:
    """The problem line for a colour (RGB/RGBA) label in a folder dataset, suggesting
    ``dast convert labels``; None when ``path`` is not a colour image."""
    try:
        with Image.open(path) as img:
            mode = img.mode
    except Exception:  # noqa: BLE001 - an unreadable file keeps the reader's own message
        return None
    if mode not in ("RGB", "RGBA"):
        return None
    out = label_dir.with_name(f"{label_dir.name}_index")
    return (
        f"label {path} is an {mode} colour image, not a class-index map; convert colour labels with "
        f"'dast convert labels --classes {classes or 'classes.yaml'} --in {label_dir} --out {out}' "
        f"and use {out.name} as the label folder"
    )


def _with_colour_hint(
    read_label: Callable[[Path], np.ndarray], label_dir: Path, classes: str | Path | None
) -> Callable[[Path], np.ndarray]:
    def read(path: Path) -> np.ndarray:
        try:
            return read_label(path)
        except DataError as exc:
            hint = colour_label_hint(path, label_dir, classes)
            if hint is None:
                raise
            raise DataError(hint) from exc

    return read


def _check_pair(image: Path, label: Path | None, read_label: Callable[[Path], np.ndarray]) -> list[str]:
    problems = []
    try:
        rgb = read_image(image)
    except DataError as exc:
        problems.append(str(exc))
        rgb = None
    if label is None:
        return problems
    try:
        lab = read_label(label)
    except DataError as exc:
        problems.append(str(exc))
        return problems
    if rgb is not None and rgb.shape[:2] != lab.shape[:2]:
        problems.append(
            f"size mismatch: image {image} is {rgb.shape[1]}x{rgb.shape[0]} but label {label} is "
            f"{lab.shape[1]}x{lab.shape[0]}"
        )
    return problems


def _folder_problems(layout: Layout, problems: list[str]) -> list[tuple[str, Path]]:
    """Missing folders, an empty image folder and duplicate names; returns the (name, image) list."""
    if not layout.image_dir.is_dir():
        problems.append(f"missing image folder: {layout.image_dir}")
    if layout.label_dir is not None and not layout.label_dir.is_dir():
        hint = ""
        if layout.kind == "folder":
            hint = (
                " (the images were checked without labels; for an unlabelled dataset, such as a target "
                "domain, pass --no-labels)"
            )
        problems.append(f"missing label folder: {layout.label_dir}{hint}")
    images = layout.image_files() if layout.image_dir.is_dir() else []
    if layout.image_dir.is_dir() and not images:
        kinds = "/".join(e.lstrip(".") for e in IMAGE_EXTS) if layout.kind == "folder" else "png"
        problems.append(f"no images in {layout.image_dir} (looked for {kinds} files)")
    seen: dict[str, Path] = {}
    for name, path in images:
        if name in seen:
            problems.append(f"two images share the name '{name}': {seen[name]} and {path}")
        seen.setdefault(name, path)
    return images


def _listed(
    images: list[tuple[str, Path]], list_file: str | Path, layout: Layout, problems: list[str]
) -> list[tuple[str, Path]]:
    """The images a list file names (a line without an image is a problem)."""
    names = {n for n, _ in images}
    wanted: set[str] = set()
    for lineno, entry, name in read_list_file(list_file):
        if name in names:
            wanted.add(name)
        else:
            problems.append(f"{list_file}:{lineno}: '{entry}' has no image in {layout.image_dir}")
    return [(n, p) for n, p in images if n in wanted]


def _structure(layout: Layout, list_file: str | Path | None, result: CheckResult) -> list[tuple[Path, Path | None]]:
    """Folders, pairing and list-file problems; returns the (image, label) pairs to read."""
    problems = result.problems
    all_images = _folder_problems(layout, problems)
    images = _listed(all_images, list_file, layout, problems) if list_file is not None else all_images
    label_dir_ok = layout.label_dir is not None and layout.label_dir.is_dir()
    pairs: list[tuple[Path, Path | None]] = []
    for name, path in images:
        label = layout.label_path(name, path) if label_dir_ok else None
        if label is not None and not label.is_file():
            problems.append(f"image without label: {path} (expected {label})")
            label = None
        pairs.append((path, label))
    seen = {n for n, _ in all_images}
    for name, path in layout.label_files() if layout.image_dir.is_dir() else []:
        if name not in seen:
            problems.append(f"label without image: {path}")
    result.num_images = len(images)
    result.num_labels = sum(1 for _, lab in pairs if lab is not None)
    return pairs


def scan_dataset(
    dataset: DatasetConfig,
    num_classes: int | None = None,
    *,
    class_file: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> CheckResult:
    """Check every file of the dataset ``dataset`` describes (kind, root, split, list file,
    folder names); a missing root is a :class:`UserError`.

    ``class_file`` (folder datasets) is the class list named in the hint for colour labels
    (default: ``ROOT/classes.yaml`` when it exists)."""
    kind, classes = dataset.kind, class_file
    r = Path(dataset.root or ".")
    if dataset.root is None or not r.is_dir():
        raise UserError(missing_root_message(r, "--root"))
    layout = layout_for(kind, r, dataset.split, dataset.images, dataset.labels)
    result = CheckResult()
    pairs = _structure(layout, dataset.list_file, result)
    read_label = _label_checker(kind, r, num_classes)
    if kind == "folder" and layout.label_dir is not None:
        if classes is None and (r / "classes.yaml").is_file():
            classes = r / "classes.yaml"
        read_label = _with_colour_hint(read_label, layout.label_dir, classes)
    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        found = pool.map(lambda p: _check_pair(p[0], p[1], read_label), pairs)
        for problems in report_progress(found, total=len(pairs), desc=f"checking {kind}", enabled=progress):
            result.problems.extend(problems)
    return result


def check_dataset(
    kind: str,
    root: str | Path,
    split: str = "train",
    list_file: str | Path | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> list[str]:
    """Every problem of a dataset on disk, one readable line each (empty when clean);
    ``kwargs``: the folder names ``images`` and ``labels``, and :func:`scan_dataset`'s keywords."""
    names: dict[str, Any] = {k: kwargs.pop(k) for k in ("images", "labels") if k in kwargs}
    list_name = str(list_file) if list_file is not None else None
    fields: dict[str, Any] = {"kind": kind, "root": str(root), "split": split, "list_file": list_name, **names}
    dataset = DatasetConfig.model_validate(fields)
    return scan_dataset(dataset, num_classes, **kwargs).problems
