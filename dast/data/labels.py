"""Class tables and label-id mappings of the supported datasets.

The Cityscapes table (names, colours, label id -> train id) comes from
``cityscapesscripts.helpers.labels``; GTA5 labels use the same label ids. SYNTHIA has
its own ids, mapped to the 19 Cityscapes train ids here; its evaluation protocols
report the mIoU over 16 and 13 of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml
from cityscapesscripts.helpers import labels as cs_labels

from dast.constants import IGNORE_INDEX
from dast.data.synthetic import SYNTHETIC_CLASSES
from dast.errors import ConfigError, DataError
from dast.palette import as_color


class DatasetClasses(Protocol):
    """What :func:`table_for` reads of a dataset config (:class:`dast.config.DatasetConfig`)."""

    @property
    def kind(self) -> str: ...

    @property
    def root(self) -> str | None: ...

    @property
    def classes(self) -> Sequence[Any] | None: ...


CITYSCAPES_NUM_CLASSES = 19
CITYSCAPES_MAX_ID = 33  # label ids stored in GTA5 and Cityscapes label PNGs: 0..33
SYNTHIA_MAX_ID = 22  # SYNTHIA-RAND-CITYSCAPES class ids: 0 (void) .. 22 (lanemarking)

# SYNTHIA class id -> Cityscapes train id; every other id is ignored.
SYNTHIA_TO_TRAIN: dict[int, int] = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    16: 9,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    18: 14,
    19: 15,
    20: 16,
    12: 17,
    11: 18,
}

# The 16-class protocol drops terrain (9), truck (14) and train (16); the 13-class one
# (mIoU*) also drops wall (3), fence (4) and pole (5).
SYNTHIA_16: tuple[int, ...] = tuple(c for c in range(19) if c not in (9, 14, 16))
SYNTHIA_13: tuple[int, ...] = tuple(c for c in SYNTHIA_16 if c not in (3, 4, 5))

CITYSCAPE_LIKE = ("gta5", "synthia", "cityscapes")


@dataclass(frozen=True)
class ClassTable:
    """Names and RGB colours of the classes, indexed by train id."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        colors = tuple(tuple(int(v) for v in c) for c in self.colors)
        if len(names) != len(colors):
            raise ValueError(f"{len(names)} class names but {len(colors)} colours")
        if not names:
            raise ValueError("a class table needs at least one class")
        if len(names) > IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX} classes are supported, got {len(names)}")
        for c in colors:
            if len(c) != 3 or any(not 0 <= v <= 255 for v in c):
                raise ValueError(f"a class colour must be three values in 0..255, got {c}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "colors", colors)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette(self) -> list[int]:
        """A flat 768-entry palette for PIL 'P' images (unused entries, 255 included, black)."""
        flat = [0] * 768
        for i, c in enumerate(self.colors):
            flat[3 * i : 3 * i + 3] = list(c)
        return flat


def cityscapes_table() -> ClassTable:
    """The 19 Cityscapes evaluation classes in train-id order."""
    labels = [cs_labels.trainId2label[t] for t in range(CITYSCAPES_NUM_CLASSES)]
    return ClassTable(tuple(lab.name for lab in labels), tuple(tuple(lab.color) for lab in labels))


def cityscapes_id_to_train_lut() -> np.ndarray:
    """(256,) uint8: Cityscapes label id -> train id (255 for ignored and unknown ids)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in cs_labels.labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < CITYSCAPES_NUM_CLASSES:
            lut[label.id] = label.trainId
    return lut


def train_to_cityscapes_id() -> np.ndarray:
    """(256,) uint8: train id -> Cityscapes label id (255 and unknown -> 0, 'unlabeled')."""
    lut = np.zeros(256, dtype=np.uint8)
    for t in range(CITYSCAPES_NUM_CLASSES):
        lut[t] = cs_labels.trainId2label[t].id
    return lut


def synthia_id_to_train_lut() -> np.ndarray:
    """(65536,) uint8: SYNTHIA class id -> Cityscapes train id (255 elsewhere)."""
    lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for sid, tid in SYNTHIA_TO_TRAIN.items():
        lut[sid] = tid
    return lut


def protocols_for(kind: str) -> dict[str, tuple[int, ...]]:
    """Extra mIoU protocols reported for a source dataset kind (SYNTHIA: 16 and 13 classes)."""
    if kind == "synthia":
        return {"miou_16": SYNTHIA_16, "miou_13": SYNTHIA_13}
    return {}


def parse_class_list(data: Any, source: str) -> ClassTable:
    """A list of ``{name, color}`` mappings (from YAML or a config) -> :class:`ClassTable`."""
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{source}: expected a non-empty list of {{name, color}} entries")
    names: list[str] = []
    colors: list[tuple[int, int, int]] = []
    for i, entry in enumerate(data):
        if hasattr(entry, "model_dump"):
            entry = entry.model_dump()
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{source}: class {i} must be a mapping with a 'name'")
        color = entry.get("color", (0, 0, 0))
        try:
            rgb = tuple(int(v) for v in color)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: class {i} ({entry['name']}) has an invalid colour {color!r}") from None
        if len(rgb) != 3 or any(not 0 <= v <= 255 for v in rgb):
            raise ConfigError(f"{source}: class {i} ({entry['name']}) colour must be three values in 0..255")
        names.append(str(entry["name"]))
        colors.append(rgb)
    if len(names) > IGNORE_INDEX:
        raise ConfigError(f"{source}: at most {IGNORE_INDEX} classes are supported, got {len(names)}")
    return ClassTable(tuple(names), tuple(colors))


def read_class_file(path: str | Path) -> ClassTable:
    """Read a ``classes.yaml``: a list of ``{name, color}`` entries."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"class list not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"class list {p} is not valid YAML: {type(exc).__name__}") from None
    return parse_class_list(data, str(p))


def _table_from_pairs(pairs: Sequence[tuple[str, Sequence[int]]]) -> ClassTable:
    return ClassTable(tuple(n for n, _ in pairs), tuple(as_color(c) for _, c in pairs))


def table_for(cfg: DatasetClasses, num_classes: int | None = None) -> ClassTable:
    """The class table of a dataset config; ``num_classes`` (if given) must agree with it."""
    if cfg.kind in CITYSCAPE_LIKE:
        table = cityscapes_table()
        where = f"the {cfg.kind} dataset"
    elif cfg.kind == "folder":
        if cfg.classes is not None:
            table = parse_class_list(list(cfg.classes), "config key 'classes'")
            where = "the config's class list"
        elif cfg.root is not None and (Path(cfg.root) / "classes.yaml").is_file():
            table = read_class_file(Path(cfg.root) / "classes.yaml")
            where = str(Path(cfg.root) / "classes.yaml")
        else:
            raise ConfigError(
                f"folder dataset at {cfg.root}: no class list; set 'classes' in the config or "
                f"write {Path(cfg.root or '.') / 'classes.yaml'}"
            )
    elif cfg.kind == "synthetic":
        table = _table_from_pairs(SYNTHETIC_CLASSES)
        where = "the synthetic demo domains"
    else:
        raise ConfigError(f"unknown dataset kind {cfg.kind!r}")
    if num_classes is not None and table.num_classes != num_classes:
        raise ConfigError(
            f"config key 'model.num_classes' is {num_classes} but {where} has {table.num_classes} classes"
        )
    return table
