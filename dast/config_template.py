"""A commented training config for a user's own folders (``dast init-config``).

:func:`folder_facts` reads what the config needs from the folders (the class list, the
image count and the first image's size); :func:`config_template` writes the YAML text. The
config trains dast's small network, so that a first run takes minutes on a CPU; its
comments say what to change for a real run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dast import __version__
from dast.data.check import missing_root_message
from dast.data.datasets import IMAGE_EXTS
from dast.data.labels import ClassTable, read_class_file
from dast.errors import UserError

SMOKE_WIDTH = 512  # the smoke run's images are at most this wide (the aspect ratio is kept)
MIN_SIDE = 32  # the corrector's five stride-2 convolutions need 32 pixels on each side


@dataclass(frozen=True)
class FolderFacts:
    """What the config needs to know about one dataset folder."""

    root: str  # as the user gave it
    images: int
    size: tuple[int, int]  # (width, height) of its first image
    has_labels: bool


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def folder_facts(root: str, role: str, needs_labels: bool) -> FolderFacts:
    """Count the images of ``root/images`` and read the first one's size; a missing root,
    image folder or (when ``needs_labels``) label folder is a UserError naming ``role``."""
    r = Path(root)
    if not r.is_dir():
        raise UserError(missing_root_message(r, f"--{role}"))
    image_dir = r / "images"
    files = _images(image_dir) if image_dir.is_dir() else []
    if not files:
        raise UserError(f"the {role} folder {r} has no images in {image_dir} (png/jpg/jpeg files)")
    has_labels = (r / "labels").is_dir()
    if needs_labels and not has_labels:
        colour = r / "labels_colour"
        hint = (
            f"; convert the colour labels first: dast convert labels --classes {r / 'classes.yaml'} "
            f"--in {colour} --out {r / 'labels'}"
            if colour.is_dir()
            else " (single-channel class-index PNGs named like the images, 255 = ignore)"
        )
        raise UserError(f"the {role} folder {r} has no label folder {r / 'labels'}{hint}")
    try:
        with Image.open(files[0]) as img:
            size = img.size
    except OSError as exc:
        raise UserError(f"cannot read {files[0]}: {exc}") from None
    return FolderFacts(root, len(files), (int(size[0]), int(size[1])), has_labels)


def smoke_size(size: tuple[int, int], max_width: int = SMOKE_WIDTH) -> tuple[int, int]:
    """(width, height) for a first run: at most ``max_width`` wide, the aspect ratio kept,
    both sides multiples of 8 and at least 32."""
    w, h = size
    scale = min(1.0, max_width / w)
    return max(MIN_SIDE, round(w * scale / 8) * 8), max(MIN_SIDE, round(h * scale / 8) * 8)


def read_source_classes(source: str, classes: str | None) -> tuple[ClassTable, str]:
    """The class list (``--classes`` or ``SOURCE/classes.yaml``) and where it came from."""
    path = Path(classes) if classes else Path(source) / "classes.yaml"
    if not path.is_file():
        raise UserError(
            f"class list not found: {path}; write it (one '- {{name: road, color: [128, 64, 128]}}' line per "
            "class, in index order) or pass --classes FILE"
        )
    return read_class_file(path), str(path)


def _c(text: str, comment: str) -> str:
    """A YAML line with its comment aligned at column 28."""
    return f"{text:<27} # {comment}"


def _dataset(role: str, f: FolderFacts, labelled: bool, classes_note: str) -> list[str]:
    w, h = smoke_size(f.size)
    lines = [f"{role}:", "  kind: folder"]
    lines.append(_c(f"  root: {f.root}", f"{f.images} images; relative to the working directory"))
    lines.append("  images: images")
    if labelled:
        lines.append(_c("  labels: labels", "class-index PNGs named like the images, 255 = ignore"))
    else:
        lines += [_c("  labels: null", "no labels are needed"), "  with_labels: false"]
    first = f"{f.size[0]}x{f.size[1]}"
    lines.append(_c(f"  size: [{w}, {h}]", f"(width, height) the images are resized to; the first is {first}"))
    if classes_note:
        lines.append(f"  # {classes_note}")
    return lines


def config_template(
    source: FolderFacts,
    target: FolderFacts,
    val: FolderFacts | None,
    table: ClassTable,
    classes_path: str,
    *,
    steps: int = 1000,
    rounds: int = 1,
) -> str:
    """The YAML text of a commented config for these folders (see the module docstring)."""
    names = ", ".join(table.names)
    selection = min(60, source.images)
    lines = [
        f"# A dast training config for your own folders, written by `dast init-config` (dast {__version__}).",
        "# Check it before training (roots, class lists, output folder; 3 steps timed):",
        "#   dast train --config THIS_FILE --out runs/mine --dry-run",
        "# `dast configs THIS_FILE` prints it with every default filled in; docs/configs.md lists every key.",
        "#",
        "# It trains dast's small network for a first run that takes minutes on a CPU. For real results:",
        "#   model: {arch: resnet101, init: weights/resnet101_init.safetensors, norm: caffe} (from",
        "#   `dast convert imagenet`, docs/weights.md), or any timm backbone (docs/backbones.md); larger",
        "#   sizes; and the paper's schedule: `extends: base/common` (150k stage-1 steps, 3 rounds).",
        "seed: 0",
        "variant: paper",
        "model:",
        _c("  arch: small", "dast's tiny ResNet (random init); resnet101 / vgg16 / timm for real runs"),
        _c(f"  num_classes: {table.num_classes}", f"{classes_path}: {names}"),
        _c("  norm: unit", "inputs scaled to 0..1"),
        "  output_stride: 8",
        *_dataset("source", source, True, f"classes: read from {classes_path}"),
        *_dataset("target", target, False, "classes: the source's (an unlabelled target needs none)"),
    ]
    if val is not None:
        lines += _dataset("val", val, True, "classes: val/classes.yaml if it has one, else the source's")
    else:
        lines += [
            "# val: no labelled target images: the run picks its snapshots with the label-free score",
            "# and reports no final mIoU. Add a labelled set of the target domain with `dast init-config --val`.",
        ]
    lines += [
        "adversarial:",
        _c("  corrector_width: 16", "the corrector's first layer (the paper: 64); 16 suits the small network"),
        "  lambda_d: 0.01",
        "  lambda_c: 0.01",
        "  lr: 0.001",
        "train:",
        _c(f"  steps: {steps}", "stage-1 iterations (the paper: 150000)"),
        _c(f"  poly_steps: {2 * steps}", "the poly learning-rate schedule runs over this many"),
        "  lr: 0.0025",
        "  batch_size: 2",
        _c("  num_workers: 2", "data-loading processes"),
        f"  checkpoint_every: {max(1, steps // 4)}",
        "  keep_last: 2",
        f"  eval_every: {max(1, steps // 4)}",
        f"  image_every: {max(1, steps // 4)}",
        "  log_every: 25",
        "self_training:",
        _c(f"  rounds: {rounds}", "pseudo-label rounds after stage 1 (the paper: 3)"),
        f"  steps: {max(1, steps // 3)}",
        f"  poly_steps: {2 * steps}",
        _c("  portion: 0.5", "the top 50% most confident pixels of each class"),
        "selection:",
        _c("  enabled: true", "snapshots chosen on FDA-restyled source images, never on target labels"),
        f"  num_images: {selection}",
        "  betas: [0.5, 0.9]",
        "runtime:",
        _c("  device: auto", "cuda when available"),
    ]
    return "\n".join(lines) + "\n"
