"""Checks of a training run before anything trains: every dataset root, image and label
folder, class list, the init file and the output folder.

Each problem is one line that names the dataset role (source, target, val) or the config
key, and gives relative paths with their absolute form (dataset roots are taken from the
working directory, while ``extends:`` is taken from the config file). ``dast train`` stops
on the data and init problems before it creates the run directory; ``dast train --dry-run``
lists them all, with the output folder's, and exits 1.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dast.checkpoint import read_meta
from dast.config import Config, DatasetConfig
from dast.data.check import missing_root_message
from dast.data.datasets import FILE_KINDS, IMAGE_EXTS, layout_for, read_list_file
from dast.data.labels import ClassTable, table_for
from dast.errors import UserError
from dast.rundir import RunDir

ROLES = ("source", "target", "val")
# the training pipeline reads source and val labels, never the target's
NEEDS_LABELS = {"source": True, "target": False, "val": True}


@dataclass(frozen=True)
class DatasetFacts:
    """What the checks found out about one dataset of a run."""

    role: str
    kind: str
    root: Path | None  # absolute; None for synthetic sets
    images: int  # the images the run will use (after a list file)
    labels: bool  # whether the run reads its labels
    table: ClassTable | None  # None when the class list could not be read


def shown(path: Path) -> str:
    """A path as given and, when relative, absolute (relative to the working directory)."""
    return str(path) if path.is_absolute() else f"{path} (= {path.absolute()})"


def _folder_images(ds: DatasetConfig, role: str, problems: list[str]) -> tuple[Path | None, int]:
    """(absolute root, image count) of a file dataset; its problems appended to ``problems``."""
    if ds.root is None:
        problems.append(f"the {role} dataset ({ds.kind}) has no root: set '{role}.root'")
        return None, 0
    root = Path(ds.root)
    if not root.is_dir():
        problems.append(missing_root_message(root, f"the {role} dataset's '{role}.root'"))
        return root.absolute(), 0
    layout = layout_for(ds.kind, root, ds.split, ds.images, ds.labels)
    if not layout.image_dir.is_dir():
        problems.append(f"the {role} dataset's image folder not found: {shown(layout.image_dir)}")
        return root.absolute(), 0
    found = layout.image_files()
    if not found:
        kinds = "/".join(e.lstrip(".") for e in IMAGE_EXTS) if ds.kind == "folder" else "png"
        problems.append(f"the {role} dataset has no images in {shown(layout.image_dir)} (looked for {kinds} files)")
        return root.absolute(), 0
    names = [n for n, _ in found]
    if ds.list_file:
        try:
            wanted = {name for _, _, name in read_list_file(ds.list_file)}
        except UserError as exc:
            problems.append(f"the {role} dataset: {exc}")
            return root.absolute(), len(names)
        names = [n for n in names if n in wanted]
    if NEEDS_LABELS[role]:
        if layout.label_dir is None or not layout.label_dir.is_dir():
            where = shown(layout.label_dir) if layout.label_dir is not None else f"none ('{role}.labels' is null)"
            problems.append(f"the {role} dataset's label folder not found: {where}; the {role} set needs labels")
        else:
            used = set(names)
            labels = [(p, layout.label_path(n, p)) for n, p in found if n in used]
            missing = [(p, lab) for p, lab in labels if lab is None or not lab.is_file()]
            if missing:
                more = f" ({len(missing) - 1} more {role} images lack labels)" if len(missing) > 1 else ""
                problems.append(f"the {role} image {missing[0][0]} has no label file {missing[0][1]}{more}")
    return root.absolute(), len(names)


def dataset_facts(cfg: Config) -> tuple[list[DatasetFacts], list[str]]:
    """(what each dataset of the run holds, a line per problem) for source, target and val."""
    problems: list[str] = []
    facts: list[DatasetFacts] = []
    for role in ROLES:
        ds = getattr(cfg, role)
        if ds is None:
            continue
        before = len(problems)
        if ds.kind in FILE_KINDS:
            root, count = _folder_images(ds, role, problems)
        else:
            root, count = None, ds.count
            if ds.size is None:
                problems.append(f"config key '{role}.size' is required for a synthetic dataset (width, height)")
        table = None
        if _check_classes(ds, role, root, missing_files=len(problems) > before, source=facts[0] if facts else None):
            try:
                table = table_for(ds, cfg.model.num_classes)
            except UserError as exc:
                problems.append(f"the {role} dataset: {exc}")
        facts.append(DatasetFacts(role, ds.kind, root, count, NEEDS_LABELS[role], table))
    problems += class_list_problems(facts)
    return facts, problems


def _check_classes(
    ds: DatasetConfig, role: str, root: Path | None, missing_files: bool, source: DatasetFacts | None
) -> bool:
    """Whether to read a dataset's class list: not for a folder set whose files are missing
    (its class list would be missing too), nor for a target or val folder set that takes the
    source's list when the source's could not be read (the source's problem says why)."""
    own_list = ds.kind != "folder" or ds.classes is not None or (root is not None and (root / "classes.yaml").is_file())
    if own_list:
        return True
    if role != "source":
        return source is not None and source.table is not None
    return not missing_files


def class_list_problems(facts: list[DatasetFacts]) -> list[str]:
    """A line for each labelled dataset besides the source (val) whose class names differ from
    the source's: same count, other names or order, so its label values would be scored as
    other classes. (The target's labels are never read.)"""
    source = next((f for f in facts if f.role == "source" and f.table is not None), None)
    if source is None or source.table is None:
        return []
    out = []
    for f in facts:
        if f.role == "source" or not f.labels or f.table is None or f.table.names == source.table.names:
            continue
        out.append(
            f"class lists differ: the source has {list(source.table.names)}, the {f.role} "
            f"{list(f.table.names)}; the same label value must mean the same class in both"
        )
    return out


def init_problems(cfg: Config) -> list[str]:
    """A line if ``model.init`` is missing, unreadable or made for another model."""
    if not cfg.model.init:
        return []
    path = Path(cfg.model.init)
    if not path.is_file():
        what = "not found" if not path.exists() else "is not a file"
        return [f"model.init {what}: {shown(path)}"]
    try:
        spec = read_meta(path).get("model", {})
    except UserError as exc:
        return [f"model.init: {exc}"]
    want = {"arch": cfg.model.arch, "num_classes": cfg.model.num_classes, "timm_name": cfg.model.timm_name}
    return [
        f"model.init {cfg.model.init} is for {key}={spec[key]!r}, the config asks for {value!r}"
        for key, value in want.items()
        if key in spec and spec[key] != value
    ]


def output_problems(run_dir: Path, resume: bool, force: bool) -> list[str]:
    """A line if the run directory cannot be used: a file in the way, a folder that is not
    empty (without --resume/--force), nothing to resume, or no permission to write."""
    if run_dir.exists() and not run_dir.is_dir():
        return [f"run directory {shown(run_dir)} exists and is not a directory"]
    if resume and not RunDir(run_dir).config.is_file():
        return [f"nothing to resume in {shown(run_dir)}: no config.yaml (start it without --resume)"]
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()) and not force:
        return [
            f"run directory {shown(run_dir)} already exists and is not empty (use --resume to continue it, or --force)"
        ]
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"cannot create run directory {shown(run_dir)}: {existing} is a file"]
    try:
        fd, probe = tempfile.mkstemp(prefix=".dast-write-test-", dir=existing)
    except OSError as exc:
        return [f"run directory {shown(run_dir)} is not writable: {exc.strerror or exc} in {existing}"]
    os.close(fd)
    os.unlink(probe)
    return []


def training_problems(cfg: Config) -> list[str]:
    """The data and init problems of a run (what ``dast train`` checks before it starts)."""
    _, problems = dataset_facts(cfg)
    return problems + init_problems(cfg)
