"""Predict target images with a trained model: trainId PNGs, colour pictures, attention maps.

The model runs through :class:`dast.inference.segmenter.Segmenter`, the one inference
path: preprocessing follows the checkpoint (RGB read with PIL, resized to
``spec.input_size`` with PIL bicubic, kept as is when the spec has none, normalised with
``spec.norm``); the target path (segmentor + discoverer attention) runs in eval mode
without gradients; its logits are upsampled bilinearly (``align_corners=True``) to the
original image size before the argmax, as in the evaluation protocol. This module adds
the folder work around it: input expansion, output naming, batching by size, reader
processes and a thread pool that writes the files.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dast.atomic import write_with
from dast.data.workers import loader_iterator, worker_init
from dast.errors import DataError, UserError
from dast.execution import Execution
from dast.inference.images import image_size, read_rgb
from dast.inference.segmenter import Segmenter, prepare_image
from dast.inference.visualize import colorize, heatmap, overlay, palette_for, save_png
from dast.models.io import ModelSpec, Networks

__all__ = [
    "expand_inputs",
    "image_size",
    "output_paths",
    "output_stem",
    "plan_outputs",
    "predict_paths",
    "read_rgb",
    "size_batches",
    "write_prediction",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CITYSCAPES_SUFFIX = "_leftImg8bit"
OUTPUT_SUFFIXES = ("", "_color", "_overlay", "_attention")
_GLOB_CHARS = "*?["


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has one of the image suffixes predict reads from folders and globs."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """Turn files, folders and glob patterns into a list of image paths.

    A folder contributes its png/jpg/jpeg/bmp files (sorted, not recursive); a glob
    pattern contributes the matching image files (sorted); a file is taken as given.
    The same file named twice is kept once. Nothing found is a :class:`UserError`.
    """
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    for item in items:
        p = Path(item)
        if p.is_dir():
            for child in sorted(p.iterdir()):
                if child.is_file() and is_image_file(child):
                    add(child)
        elif p.is_file():
            add(p)
        elif any(ch in item for ch in _GLOB_CHARS):
            for m in sorted(glob.glob(item)):
                mp = Path(m)
                if mp.is_file() and is_image_file(mp):
                    add(mp)
        else:
            raise UserError(f"input not found: {item}")
    if not out:
        raise UserError(f"no images (png, jpg, jpeg, bmp) found in: {' '.join(items)}")
    return out


def output_stem(path: Path) -> str:
    """The name predictions of ``path`` are written under.

    The file stem, without the Cityscapes ``_leftImg8bit`` suffix, so that prediction
    folders follow the naming ``dast evaluate --predictions`` expects.
    """
    stem = path.stem
    if stem.endswith(CITYSCAPES_SUFFIX) and len(stem) > len(CITYSCAPES_SUFFIX):
        stem = stem[: -len(CITYSCAPES_SUFFIX)]
    return stem


def output_paths(out_dir: Path, stem: str, save_logits: bool) -> dict[str, Path]:
    """The files written for one image, keyed by kind."""
    files = {
        "label": out_dir / f"{stem}.png",
        "color": out_dir / f"{stem}_color.png",
        "overlay": out_dir / f"{stem}_overlay.png",
        "attention": out_dir / f"{stem}_attention.png",
    }
    if save_logits:
        files["logits"] = out_dir / f"{stem}.npy"
    return files


def plan_outputs(inputs: Sequence[Path], out_dir: Path, save_logits: bool) -> list[dict[str, Path]]:
    """Output files per input; refuses duplicate stems, clashing names and overwriting inputs."""
    owner: dict[Path, Path] = {}
    stems: dict[str, Path] = {}
    sources = {p.resolve() for p in inputs}
    plans = []
    for p in inputs:
        stem = output_stem(p)
        if stem in stems:
            raise UserError(f"two inputs would write the same predictions '{stem}': {stems[stem]} and {p}")
        stems[stem] = p
        files = output_paths(out_dir, stem, save_logits)
        for f in files.values():
            if f in owner:
                raise UserError(f"output {f} would be written for both {owner[f]} and {p}; rename one of them")
            if f.resolve() in sources:
                raise UserError(f"output {f} would overwrite an input image; choose another --out folder")
            owner[f] = p
        plans.append(files)
    return plans


@dataclass(frozen=True)
class _Sample:
    index: int
    rgb: np.ndarray | None
    x: torch.Tensor | None
    error: str | None


class _ImageSet(Dataset):
    """Reads, resizes and normalises images; a failure is returned, never raised in a worker."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int] | None, norm: str) -> None:
        self.paths = list(paths)
        self.size = size
        self.norm = norm

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> _Sample:
        try:
            rgb = read_rgb(self.paths[i])
        except DataError as exc:
            return _Sample(i, None, None, str(exc))
        return _Sample(i, rgb, prepare_image(rgb, self.size, self.norm), None)


def _collate(samples: list[_Sample]) -> list[_Sample]:
    return samples


def size_batches(paths: Sequence[Path], input_size: tuple[int, int] | None, batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of images that reach the network at the same size.

    With a fixed ``input_size`` every image qualifies; otherwise images are grouped by
    their native size (read from the file headers). Input order is kept within a group.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(paths):
        key = (input_size[0], input_size[1]) if input_size is not None else image_size(p)
        groups.setdefault(key, []).append(i)
    return [idx[s : s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file handle: np.save would append ".npy" to a path
            np.save(fh, arr)

    write_with(path, _write, fsync=False)


def write_prediction(
    files: dict[str, Path],
    rgb: np.ndarray,
    label: np.ndarray,
    att: np.ndarray,
    colors: Sequence[Sequence[int]],
    logits: np.ndarray | None,
) -> None:
    """Write the PNGs (and optionally the logits) of one image, each file atomically."""
    color = colorize(label, colors)
    save_png(files["label"], label, fsync=False)
    save_png(files["color"], color, fsync=False)
    save_png(files["overlay"], overlay(rgb, color), fsync=False)
    save_png(files["attention"], heatmap(att), fsync=False)
    if logits is not None:
        _save_npy(files["logits"], logits)


def class_colors(spec: ModelSpec) -> list[tuple[int, int, int]]:
    """The colours of the checkpoint's classes (Cityscapes or a generated palette if unset)."""
    return palette_for(spec.num_classes, spec.class_colors or None)


def predict_paths(
    nets: Networks,
    inputs: Sequence[Path],
    out_dir: str | os.PathLike[str],
    execution: Execution | None = None,
    *,
    save_logits: bool = False,
) -> list[dict[str, Any]]:
    """Predict ``inputs`` with the target path of ``nets`` and write the results to ``out_dir``.

    Per image ``<stem>``: ``<stem>.png`` (trainIds, uint8, original resolution),
    ``<stem>_color.png``, ``<stem>_overlay.png``, ``<stem>_attention.png`` and, with
    ``save_logits``, ``<stem>.npy`` (float32 C x h x w logits before upsampling).
    Images that reach the network at the same size are batched. Returns one record per
    input, in input order. An unreadable image stops the run with a :class:`DataError`
    naming it; nothing is written for it.
    """
    spec, ex = nets.spec, execution or Execution()
    if spec.num_classes > 255:
        raise UserError(f"trainId PNGs hold at most 255 classes; this model has {spec.num_classes}")
    out = Path(out_dir)
    paths = [Path(p) for p in inputs]
    plans = plan_outputs(paths, out, save_logits)
    segmenter = Segmenter(nets, ex.device, amp_dtype=ex.amp_dtype)
    batches = size_batches(paths, segmenter.input_size, ex.batch_size)
    colors = class_colors(spec)
    loader = DataLoader(
        _ImageSet(paths, segmenter.input_size, segmenter.norm),
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=max(0, ex.num_workers),
        worker_init_fn=worker_init(ex.num_workers),
    )
    records: list[dict[str, Any] | None] = [None] * len(paths)
    pending: list[Future[None]] = []
    max_pending = 8
    writers = max(1, min(4, os.cpu_count() or 1))
    out.mkdir(parents=True, exist_ok=True)
    with (
        ThreadPoolExecutor(max_workers=writers) as pool,
        segmenter.session(),
        tqdm(total=len(paths), unit="img", desc="predict", disable=not ex.progress) as bar,
        loader_iterator(loader) as batch_iter,
    ):
        for samples in batch_iter:
            bad = next((s for s in samples if s.error is not None), None)
            if bad is not None:
                for f in pending:
                    f.result()
                raise DataError(bad.error)
            x = torch.stack([s.x for s in samples])
            logits, att = segmenter.forward_batch(x)
            for j, s in enumerate(samples):
                rgb = s.rgb
                assert rgb is not None
                h, w = rgb.shape[:2]
                up, a = segmenter.upsample(logits[j : j + 1], att[j : j + 1], (h, w))
                label = up.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
                att_np = a[0].cpu().numpy()
                raw = logits[j].cpu().numpy().astype(np.float32, copy=False) if save_logits else None
                files = plans[s.index]
                pending.append(pool.submit(write_prediction, files, rgb, label, att_np, colors, raw))
                record = {
                    "input": str(paths[s.index]),
                    "stem": output_stem(paths[s.index]),
                    "width": int(w),
                    "height": int(h),
                    "files": {k: str(v) for k, v in files.items()},
                }
                records[s.index] = record
            while len(pending) > max_pending:
                pending.pop(0).result()
            bar.update(len(samples))
        for f in pending:
            f.result()
    return [r for r in records if r is not None]
