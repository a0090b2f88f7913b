"""Pseudo-label sets on disk: run the target model over the target images, write the labels.

A round's set is written in passes over the target images (the model in eval mode, its
modules' train/eval flags restored afterwards):

* the estimation pass(es) of :class:`~dast.training.pseudo_labels.thresholds.ThresholdEstimator`
  (one for ``histogram``, two for ``exact-reference``), with ``p`` the softmax of the
  target-path logits upsampled (bilinear, ``align_corners=True``) to the input size;
* the writing pass: the labels of the chosen rule as ``<name>.png`` (uint8 trainIds, 255
  ignored), colour previews of the first images in ``preview/``, then ``stats.json`` and
  finally ``COMPLETE``.

No probability map is stored; the model runs again for each pass. A folder is marked as a
pseudo-label folder (``.dast-pseudo-labels.json``) before anything else is written, and an
earlier set there, complete or not, is cleared first. Every file is written atomically.

See ``docs/pseudo_labels.md``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn

from dast.atomic import TMP_MARK, write_json, write_text, write_with
from dast.config import SelfTrainingConfig
from dast.contexts import eval_mode
from dast.data.workers import loader_iterator, worker_init
from dast.errors import DataError, UserError
from dast.execution import Execution
from dast.models.target_model import predict_full_res
from dast.palette import color_lut, palette_for
from dast.progress import progress
from dast.rundir import PL_COMPLETE, PL_PREVIEW, PL_STATS
from dast.training.pseudo_labels.thresholds import (
    IGNORE_INDEX,
    ThresholdEstimator,
    _dist_ready,
    check_mode,
    check_portion,
    check_rule,
    select_labels,
)

COMPLETE_NAME, STATS_NAME, PREVIEW_DIR = PL_COMPLETE, PL_STATS, PL_PREVIEW  # the layout of dast.rundir
MARKER_NAME = ".dast-pseudo-labels.json"


# ---------------------------------------------------------------------------------------
# Files


def label_relpath(name: str) -> Path:
    """``<name>.png``: where the label of image ``name`` goes, relative to the output folder.

    Dataset names carry no image suffix (``dast.data.datasets.entry_to_name``); sub-folders
    in ``name`` are kept.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"pseudo labels need a non-empty image name, got {name!r}")
    rel = Path(name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or rel.parts[0] == PREVIEW_DIR:
        raise DataError(f"image name {name!r} cannot be used as a pseudo-label file name")
    return rel.with_name(rel.name + ".png")


def label_path(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>.png``: the pseudo label of the image called ``name``."""
    return Path(out_dir) / label_relpath(name)


def pseudo_label_set_complete(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished pseudo-label set (COMPLETE and stats.json)."""
    root = Path(out_dir)
    return (root / COMPLETE_NAME).is_file() and (root / STATS_NAME).is_file()


def colorize(label: np.ndarray, colors: Sequence[Sequence[int]]) -> Image.Image:
    """A palette PNG image of a trainId map (class ``i`` -> ``colors[i]``); 255 (ignore) is black."""
    img = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    rgb = [tuple(int(v) for v in c[:3]) for c in list(colors)[:IGNORE_INDEX]]
    img.putpalette(color_lut(rgb).reshape(-1).tolist())  # turns the "L" image into a "P" image
    return img


def _save_png(path: Path, img: Image.Image) -> None:
    write_with(path, lambda tmp: img.save(tmp, format="PNG"))


def _prepare_dir(out: Path) -> None:
    """Make ``out`` an empty pseudo-label folder, clearing a previous (stale) set."""
    if out.exists() and not out.is_dir():
        raise UserError(f"pseudo-label output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER_NAME).is_file():
            raise UserError(
                f"refusing to clear {out}: it is not empty and holds no pseudo-label set (no {MARKER_NAME})"
            )
        (out / COMPLETE_NAME).unlink(missing_ok=True)  # first: an interrupted clear stays incomplete
        (out / STATS_NAME).unlink(missing_ok=True)
        shutil.rmtree(out / PREVIEW_DIR, ignore_errors=True)
        for p in sorted(out.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            if p.is_file() and (p.suffix == ".png" or TMP_MARK in p.name):
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER_NAME, {"format": "dast pseudo labels", "version": 1})


class _Writer:
    """Encode and write PNGs on background threads, bounding the pending work."""

    def __init__(self, workers: int = 2, max_pending: int = 16) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.pending: list[Future[None]] = []
        self.max_pending = max_pending

    def submit(self, path: Path, img: Image.Image) -> None:
        self.pending.append(self.pool.submit(_save_png, path, img))
        while len(self.pending) > self.max_pending:
            self.pending.pop(0).result()

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------
# Passes over the target images (shared with dast.training.pseudo_labels.quality)


Batch = tuple[Tensor | None, list[str], list[str], Tensor | None]


def _collate(items: list[dict[str, Any]]) -> Batch:
    """(images, their names, names of unreadable samples left out of the batch, labels or None)."""
    skipped = [item["skipped"] for item in items if "skipped" in item]
    items = [item for item in items if "skipped" not in item]
    names = [item["name"] for item in items]
    if not items:
        return None, names, skipped, None
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) != 1:
        raise DataError(f"images of one batch differ in size ({', '.join(names)}): {sorted(shapes)}")
    has_labels = all("label" in item for item in items)
    if has_labels and len({tuple(item["label"].shape) for item in items}) != 1:
        raise DataError(f"labels of one batch differ in size ({', '.join(names)})")
    labels = torch.stack([item["label"] for item in items]) if has_labels else None
    return torch.stack([item["image"] for item in items]), names, skipped, labels


class _Subset(torch.utils.data.Dataset):
    """The samples at ``indices``. For training, a dataset with ``on_corrupt: skip`` answers an
    unreadable sample with the next readable one; here each image is taken only as itself
    (``item_or_none``), without augmentation, so it is labelled once, under its own name, and
    an unreadable one gets no label."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        j = self.indices[i]
        only_itself = getattr(self.dataset, "item_or_none", None)
        if only_itself is None:
            return self.dataset[j]
        item = only_itself(j, augment=False)  # label the images as they are, never an augmented copy
        return {"skipped": self.dataset.names[j % len(self.dataset)]} if item is None else item


def target_probabilities(model: nn.Module, images: Tensor, amp_dtype: torch.dtype | None = None) -> Tensor:
    """Softmax of the target-path logits upsampled (bilinear, align_corners) to the input size."""
    logits, _ = predict_full_res(model, images, amp_dtype=amp_dtype)
    return torch.softmax(logits, dim=1)


@dataclass
class _Run:
    """What the passes of one generation share."""

    model: nn.Module
    dataset: Any
    order: list[int]
    batch_size: int
    num_workers: int
    device: torch.device
    amp_dtype: torch.dtype | None
    progress: bool
    skipped: set[str] = field(default_factory=set)  # unreadable samples (on_corrupt: skip)

    @classmethod
    def of(cls, model: nn.Module, dataset: Any, execution: Execution, progress: bool) -> _Run:
        """The passes of ``execution`` over ``dataset`` (``progress``: this rank shows it)."""
        ex = execution
        order = ex.order(len(dataset))
        return cls(model, dataset, order, ex.batch_size, ex.num_workers, ex.torch_device, ex.amp_dtype, progress)

    def probabilities(self, desc: str) -> Iterator[tuple[Tensor, list[str], Tensor | None]]:
        """(probabilities N x C x H x W, image names, labels N x H x W or None) per batch."""
        loader = torch.utils.data.DataLoader(
            _Subset(self.dataset, self.order),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init(self.num_workers),
        )
        with loader_iterator(loader) as batches:
            for images, names, skipped, labels in progress(
                batches, total=len(loader), desc=desc, unit="batch", enabled=self.progress
            ):
                self.skipped.update(skipped)
                if images is not None:
                    yield (
                        target_probabilities(self.model, images.to(self.device, non_blocking=True), self.amp_dtype),
                        names,
                        labels,
                    )


def check_settings(settings: SelfTrainingConfig, execution: Execution) -> None:
    """Reject bad pseudo-label settings with one readable line (UserError)."""
    check_portion(settings.portion)
    check_mode(settings.estimator)
    check_rule(settings.rule)
    if not float(settings.cap) > 0.0:
        raise UserError(f"pseudo-label cap must be > 0, got {settings.cap}")
    if execution.batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {execution.batch_size}")


def model_num_classes(model: nn.Module) -> int | None:
    """``model.segmentor.num_classes`` when the model has one, else None."""
    return int(getattr(getattr(model, "segmentor", None), "num_classes", 0)) or None


@contextlib.contextmanager
def evaluating(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``model`` in eval mode on ``device`` without gradients; every module's train/eval
    flag is restored exactly afterwards (the model stays on ``device``)."""
    model.to(device)
    with eval_mode(model), torch.no_grad():
        yield


def estimate_thresholds(
    run: _Run, num_classes: int | None, settings: SelfTrainingConfig, *, reduce: bool = True
) -> ThresholdEstimator:
    """Run the estimation pass(es); the class count comes from the model output if not given.

    ``reduce`` sums each pass over the torch.distributed ranks (when initialised)."""
    est_args: dict[str, Any] = {
        "portion": settings.portion,
        "mode": settings.estimator,
        "bins": settings.bins,
        "subsample": settings.subsample,
    }
    est = ThresholdEstimator(num_classes, device=run.device, **est_args) if num_classes else None
    passes = 1 if est_args["mode"] == "histogram" else 2
    for k in range(passes):
        if est is not None:
            est.begin_pass(k)
        for prob, _, _ in run.probabilities(f"pseudo labels: thresholds {k + 1}/{passes}"):
            if est is None:
                est = ThresholdEstimator(prob.shape[1], device=run.device, **est_args)
                est.begin_pass(0)
            est.update(prob)
        if est is None:
            raise DataError("no images to pseudo-label")
        est.finish_pass(reduce=reduce)
    assert est is not None
    return est


# ---------------------------------------------------------------------------------------
# Generation


def _write_labels(
    run: _Run, thresholds: Tensor, rule: str, out: Path, palette: Sequence[Sequence[int]], previews: int
) -> tuple[Tensor, int]:
    """Write every label PNG (and the first ``previews`` colour previews); return the
    per-class labelled pixel counts (last entry: ignored pixels) and the image count."""
    num_classes = thresholds.numel()
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=run.device)
    seen: set[Path] = set()
    writer = _Writer()
    try:
        for prob, names, _ in run.probabilities("pseudo labels: writing"):
            labels = select_labels(prob, thresholds, rule)
            counts += torch.bincount(labels.reshape(-1).long().clamp_(max=num_classes), minlength=num_classes + 1)
            for name, lab in zip(names, labels.cpu().numpy()):
                rel = label_relpath(name)
                if rel in seen:
                    raise DataError(f"two target images share the name {name!r}")
                seen.add(rel)
                writer.submit(out / rel, Image.fromarray(lab))
                if len(seen) <= previews:
                    writer.submit(out / PREVIEW_DIR / rel.with_name(f"{rel.stem}_color.png"), colorize(lab, palette))
    finally:
        writer.close()
    return counts, len(seen)


def _preview_palette(colors: Sequence[Sequence[int]] | None, num_classes: int) -> list[Sequence[int]]:
    """The given class colours (at least one per class), else :func:`dast.palette.palette_for`."""
    palette: list[Sequence[int]] = list(colors) if colors else list(palette_for(num_classes))
    if len(palette) < num_classes:
        raise UserError(f"{len(palette)} colours given for {num_classes} classes")
    return palette


def _gather_names(names: set[str], distributed: bool) -> list[str]:
    """The sorted union of ``names`` over all ranks."""
    if not distributed:
        return sorted(names)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(names))
    return sorted(set().union(*everyone))


def _stats(
    run: _Run,
    est: ThresholdEstimator,
    thresholds: Tensor,
    counts: Tensor,
    written: int,
    settings: SelfTrainingConfig,
    distributed: bool,
) -> dict[str, Any]:
    """``stats.json`` of the set, with the counts summed over the ranks."""
    totals = torch.cat([counts, torch.tensor([written], dtype=torch.int64, device=counts.device)])
    if distributed:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        dist.barrier()
    *selected, ignored, num_images = (int(v) for v in totals.tolist())
    if num_images == 0:
        raise DataError(f"no readable image to pseudo-label ({len(run.skipped)} unreadable)")
    all_pixels = sum(selected) + ignored
    return {
        "thresholds": [float(v) for v in thresholds.cpu().tolist()],
        "portion": float(settings.portion),
        "cap": float(settings.cap),
        "mode": settings.estimator,
        "rule": settings.rule,
        "bins": int(settings.bins) if settings.estimator == "histogram" else None,
        "subsample": int(settings.subsample),
        "forward_passes": est.passes + 1,
        "predicted_pixels": [int(v) for v in est.counts.tolist()],
        "sampled_pixels": [int(v) for v in est.selected_counts.tolist()],
        "selected_pixels": selected,
        "ignored_fraction": ignored / all_pixels if all_pixels else 0.0,
        "num_images": num_images,
        "skipped": _gather_names(run.skipped, distributed),
    }


def generate_pseudo_labels(
    model: nn.Module,
    dataset: Any,
    out_dir: str | Path,
    settings: SelfTrainingConfig,
    *,
    execution: Execution | None = None,
    colors: Sequence[Sequence[int]] | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Write class-balanced pseudo labels for ``dataset`` into ``out_dir``; return the stats.

    ``settings`` gives the portion q, the cap, the threshold ``estimator``, the labelling
    ``rule`` (``"ratio"``, released, or ``"threshold"``; see :func:`select_labels`), the
    histogram ``bins``, the ``subsample`` and ``preview_count``; ``execution`` where and how
    the passes run (default: the CPU, one image per batch, a progress bar).
    ``dataset[i]`` gives ``{"image": FloatTensor 3 x H x W (resized, normalised), "name": str}``.
    Writes ``<name>.png`` (uint8 trainIds, 255 ignore) per image, colour previews of the
    first ``preview_count`` images in ``preview/``, ``stats.json`` and finally
    ``COMPLETE``. A folder holding an earlier (possibly partial) set is cleared first. Under
    torch.distributed each rank passes its own ``execution.indices``; thresholds are summed
    over all ranks, each rank writes its own labels (rank 0 its previews), and rank 0 writes
    the stats and the marker after a barrier. ``num_classes`` defaults to
    ``model.segmentor.num_classes``.
    """
    start = time.time()
    ex = execution or Execution()
    check_settings(settings, ex)
    distributed = _dist_ready()
    rank = dist.get_rank() if distributed else 0
    run = _Run.of(model, dataset, ex, ex.progress and rank == 0)
    if not run.order and not distributed:
        raise DataError("no images to pseudo-label")
    out = Path(out_dir)
    if rank == 0:
        _prepare_dir(out)
    if distributed:
        dist.barrier()

    with evaluating(model, run.device):
        est = estimate_thresholds(run, num_classes or model_num_classes(model), settings)
        thresholds = est.thresholds(settings.portion, settings.cap)
        palette = _preview_palette(colors, est.num_classes)
        previews = settings.preview_count if rank == 0 else 0
        counts, written = _write_labels(run, thresholds, settings.rule, out, palette, previews)

    stats = _stats(run, est, thresholds, counts, written, settings, distributed)
    stats["seconds"] = round(time.time() - start, 3)
    if rank == 0:
        write_json(out / STATS_NAME, stats)
        write_text(out / COMPLETE_NAME, json.dumps({"num_images": stats["num_images"]}) + "\n")
    if distributed:
        dist.barrier()
    return stats
