"""Class-balanced pseudo labels (DAST stage 2), streamed with constant memory.

The released selection, per round:

1. run the target model (eval) over the target training images; ``p`` is the softmax of
   the logits upsampled (bilinear, ``align_corners=True``) to the input size;
2. for each class ``c``, take the max-probability of the pixels predicted as ``c``,
   keeping every ``subsample``-th one per image (elements 0, s, 2s, ... of that class's
   pixels in row-major order), concatenated over images and sorted descending;
3. ``t_c`` is the value at position ``floor(n_c * q) - 1``, capped at ``cap``; a class with
   ``floor(n_c * q) == 0`` keeps ``t_c = 1``;
4. the label is ``argmax(p / t)``, ignored (255) where ``max(p / t) < 1``.

The release stores every probability map and Python lists of confidences. Here the
confidences go into per-class histograms held on the device of the probabilities, so the
memory does not depend on the number of images:

* ``"histogram"``: one pass, ``bins`` uniform bins on [0, 1]; the threshold is the lower
  edge of the bin holding the selected value, so ``0 <= t_exact - t_hist < 1 / bins``
  (plus at most one float32 rounding of the edge when ``bins`` is not a power of two).
* ``"exact-reference"``: a two-pass radix select over the float32 bit patterns (high 16
  bits, then the low 16 bits inside the chosen bucket); equal bit for bit to the sorted list.

See ``docs/pseudo_labels.md``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from dast.atomic import TMP_MARK, write_json, write_text, write_with
from dast.data.transforms import resize_label
from dast.data.workers import loader_iterator, worker_init
from dast.errors import DataError, UserError

MODES = ("histogram", "exact-reference")
IGNORE_INDEX = 255
COMPLETE_NAME = "COMPLETE"
STATS_NAME = "stats.json"
PREVIEW_DIR = "preview"
MARKER_NAME = ".dast-pseudo-labels.json"
_RADIX = 1 << 16

# Cityscapes trainId colours (road ... bicycle).
CITYSCAPES_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


# ---------------------------------------------------------------------------------------
# The released sorted-list method (reference for tests; O(n) memory)


def sorted_list_confidences(prob: np.ndarray, subsample: int = 4) -> list[np.ndarray]:
    """Per-class confidences of ``prob`` (N x C x H x W float32) as the release collects them.

    For each image and class: the max-probability of the pixels predicted as that class,
    in row-major order, keeping elements 0, s, 2s, ...; concatenated over the images.
    """
    prob = np.asarray(prob, dtype=np.float32)
    n_img, n_cls = prob.shape[:2]
    out: list[list[np.ndarray]] = [[] for _ in range(n_cls)]
    for i in range(n_img):
        pred = np.argmax(prob[i], axis=0)
        conf = np.amax(prob[i], axis=0)
        for c in range(n_cls):
            values = conf[pred == c]
            if values.size:
                out[c].append(values[::subsample])
    return [np.concatenate(v) if v else np.zeros(0, np.float32) for v in out]


def sorted_list_thresholds(conf_per_class: Sequence[np.ndarray], portion: float, cap: float = 0.9) -> np.ndarray:
    """The released thresholds: sort each class's confidences, take position floor(n*q)-1, cap."""
    thresholds = np.ones(len(conf_per_class), dtype=np.float32)
    for c, values in enumerate(conf_per_class):
        ordered = np.sort(np.asarray(values, dtype=np.float32))[::-1]
        k = int(math.floor(ordered.size * portion))
        if k == 0:
            continue
        value = ordered[k - 1]
        thresholds[c] = value if value < cap else cap
    return thresholds


# ---------------------------------------------------------------------------------------
# Streaming estimation


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _subsample_mask(pred: Tensor, num_classes: int, subsample: int) -> Tensor | None:
    """Boolean N x H x W mask keeping every ``subsample``-th pixel per image per class.

    A pixel is kept when its rank among the pixels of the same image predicted as the same
    class, in row-major order, is a multiple of ``subsample`` (the release's ``[0::4]``).
    """
    if subsample == 1:
        return None
    n = pred.shape[0]
    flat = pred.reshape(n, -1)
    key = (torch.arange(n, device=pred.device).unsqueeze(1) * num_classes + flat).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    sizes = torch.bincount(key, minlength=n * num_classes)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(key.numel(), device=pred.device) - starts[sorted_key]
    keep = torch.empty_like(key, dtype=torch.bool)
    keep[order] = rank % subsample == 0
    return keep.view_as(pred)


def _kth_bin_from_top(hist: Tensor, k: Tensor) -> Tensor:
    """Per row, the bin holding the k-th largest value (1-based); -1 where k == 0."""
    from_top = hist.flip(1).cumsum(1).flip(1)  # from_top[c, b] = count in bins >= b
    b = (from_top >= k.unsqueeze(1)).sum(1) - 1
    return torch.where(k > 0, b, torch.full_like(b, -1))


def _count_above(hist: Tensor, b: Tensor) -> Tensor:
    """Per row, the count in the bins strictly above bin ``b``."""
    from_top = torch.cat([hist.flip(1).cumsum(1).flip(1), hist.new_zeros(hist.shape[0], 1)], 1)
    return from_top.gather(1, (b + 1).clamp(min=0).unsqueeze(1)).squeeze(1)


class ThresholdEstimator:
    """Streaming per-class thresholds with memory independent of the dataset size.

    Usage::

        est = ThresholdEstimator(C, portion=0.5, mode="exact-reference", device=dev)
        for k in range(est.passes):
            est.begin_pass(k)
            for prob in batches():          # N x C x H x W probabilities
                est.update(prob)
            est.finish_pass()                # sums the ranks' histograms when distributed
        t = est.thresholds()                 # float32 [C]

    Every pass must see the same images (across all ranks together). State lives on
    ``device``; :meth:`state_tensors` are the tensors of the running pass, which
    :meth:`all_reduce` sums over the ranks.
    """

    def __init__(self, num_classes: int, *, portion: float | None = None, mode: str = "histogram",
                 bins: int = 65536, subsample: int = 4, device: torch.device | str = "cpu") -> None:
        if mode not in MODES:
            raise UserError(f"unknown pseudo-label mode {mode!r} (choose {' or '.join(MODES)})")
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise UserError(f"pseudo labels need 1..{IGNORE_INDEX} classes, got {num_classes}")
        if int(subsample) < 1:
            raise UserError(f"pseudo-label subsample must be >= 1, got {subsample}")
        if mode == "histogram" and int(bins) < 1:
            raise UserError(f"pseudo-label bins must be >= 1, got {bins}")
        if portion is not None:
            _check_portion(portion)
        if mode == "exact-reference" and portion is None:
            raise UserError("the exact-reference mode needs the portion before its second pass")
        self.num_classes = int(num_classes)
        self.mode = mode
        self.bins = int(bins) if mode == "histogram" else _RADIX
        self.subsample = int(subsample)
        self.portion = portion
        self.device = torch.device(device)
        self.passes = 1 if mode == "histogram" else 2
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        self.selected_counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        self._hist = torch.zeros(num_classes, self.bins, dtype=torch.int64, device=self.device)
        self._low: Tensor | None = None
        self._bucket: Tensor | None = None
        self._rank: Tensor | None = None
        self._current: int | None = None
        self._finished = 0

    # -- passes -------------------------------------------------------------------------

    def begin_pass(self, k: int) -> None:
        """Start pass ``k`` (0-based); passes run in order."""
        if self._current is not None:
            raise RuntimeError(f"pass {self._current} is still running; call finish_pass() first")
        if k != self._finished or k >= self.passes:
            raise RuntimeError(f"expected pass {self._finished} of {self.passes}, got begin_pass({k})")
        if k == 1:
            self._low = torch.zeros(self.num_classes, _RADIX, dtype=torch.int64, device=self.device)
        self._current = k

    def update(self, prob: Tensor) -> None:
        """Accumulate a batch of probabilities (N x C x H x W) into the running pass."""
        if self._current is None:
            if self._finished == 0:
                self.begin_pass(0)
            else:
                raise RuntimeError("update() outside a pass; call begin_pass() first")
        if prob.dim() != 4 or prob.shape[1] != self.num_classes:
            raise ValueError(f"expected N x {self.num_classes} x H x W probabilities, got {tuple(prob.shape)}")
        prob = prob.to(self.device)
        conf, pred = torch.max(prob, dim=1)
        conf = conf.float()
        if self._current == 0:
            self.counts += torch.bincount(pred.reshape(-1), minlength=self.num_classes)
        mask = _subsample_mask(pred, self.num_classes, self.subsample)
        if mask is not None:
            conf, pred = conf[mask], pred[mask]
        else:
            conf, pred = conf.reshape(-1), pred.reshape(-1)
        if self._current == 0:
            self.selected_counts += torch.bincount(pred, minlength=self.num_classes)
        if self.mode == "histogram":
            b = torch.floor(conf.double() * self.bins).long().clamp_(0, self.bins - 1)
            self._add(self._hist, pred, b)
            return
        bits = conf.contiguous().view(torch.int32)
        high = (bits >> 16).long()
        if self._current == 0:
            self._add(self._hist, pred, high)
            return
        assert self._bucket is not None and self._low is not None
        inside = high == self._bucket[pred]
        self._add(self._low, pred[inside], (bits[inside] & 0xFFFF).long())

    def _add(self, hist: Tensor, cls: Tensor, b: Tensor) -> None:
        width = hist.shape[1]
        hist.view(-1).add_(torch.bincount(cls * width + b, minlength=hist.numel()))

    def state_tensors(self) -> list[Tensor]:
        """The tensors of the running pass that distributed ranks must sum."""
        if self._current == 0:
            return [self.counts, self.selected_counts, self._hist]
        if self._current == 1:
            assert self._low is not None
            return [self._low]
        raise RuntimeError("no pass is running")

    def all_reduce(self) -> None:
        """Sum the running pass's state over the ranks (no-op without torch.distributed)."""
        if not _dist_ready():
            return
        for t in self.state_tensors():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def finish_pass(self, reduce: bool = True) -> None:
        """End the running pass (summing over the ranks first unless ``reduce`` is false)."""
        if self._current is None:
            raise RuntimeError("no pass is running")
        if reduce:
            self.all_reduce()
        if self.mode == "exact-reference" and self._current == 0:
            k = self._selected_k(self.portion)
            self._bucket = _kth_bin_from_top(self._hist, k)
            self._rank = k - _count_above(self._hist, self._bucket)
        self._finished += 1
        self._current = None

    @property
    def done(self) -> bool:
        """Whether every pass has finished."""
        return self._finished == self.passes

    # -- results ------------------------------------------------------------------------

    def _selected_k(self, portion: float | None) -> Tensor:
        q = float(portion)  # type: ignore[arg-type]
        ks = [int(math.floor(int(n) * q)) for n in self.selected_counts.tolist()]
        return torch.tensor(ks, dtype=torch.int64, device=self.device)

    def thresholds(self, portion: float | None = None, cap: float = 0.9) -> Tensor:
        """The per-class thresholds (float32 [C]) for ``portion`` (default: the constructor's)."""
        if not self.done:
            raise RuntimeError(f"{self.passes - self._finished} estimation pass(es) still to run")
        if portion is None:
            portion = self.portion
        if portion is None:
            raise UserError("no portion given for the pseudo-label thresholds")
        _check_portion(portion)
        if self.mode == "exact-reference":
            if self.portion is not None and portion != self.portion:
                raise RuntimeError(f"exact thresholds were resolved for portion {self.portion}, not {portion}")
            assert self._low is not None and self._bucket is not None and self._rank is not None
            low = _kth_bin_from_top(self._low, self._rank)
            valid = self._bucket >= 0
            bits = (self._bucket.clamp(min=0) << 16) | low.clamp(min=0)
            value = bits.to(torch.int32).view(torch.float32)
        else:
            k = self._selected_k(portion)
            b = _kth_bin_from_top(self._hist, k)
            valid = k > 0
            value = (b.clamp(min=0).double() / self.bins).float()
        cap_t = torch.tensor(cap, dtype=torch.float32, device=self.device)
        capped = torch.where(value < cap_t, value, cap_t)
        return torch.where(valid, capped, torch.ones_like(capped))

    def state_bytes(self) -> int:
        """Bytes held by the estimator's state (independent of the number of images)."""
        tensors = [self.counts, self.selected_counts, self._hist] + ([self._low] if self._low is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def _check_portion(portion: float) -> None:
    if not 0.0 < float(portion) <= 1.0:
        raise UserError(f"pseudo-label portion must be in (0, 1], got {portion}")


def select_labels(prob: Tensor, thresholds: Tensor) -> Tensor:
    """``argmax(p / t)`` per pixel, 255 where ``max(p / t) < 1``: uint8 N x H x W."""
    t = thresholds.to(device=prob.device, dtype=torch.float32).view(1, -1, 1, 1)
    weighted = prob.float() / t
    best, label = torch.max(weighted, dim=1)
    return label.masked_fill_(best < 1, IGNORE_INDEX).to(torch.uint8)


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


def pseudo_label_precision(label_dir: str | Path, dataset: Any) -> dict[str, Any]:
    """Score a pseudo-label set against a labelled copy of its target ``dataset``.

    Each ground truth is resized (nearest) to its pseudo label's size, as training pairs them.
    Returns ``precision`` (% of the labelled pixels that are right, ground-truth ignore pixels
    left out), ``labelled_fraction`` (% of the pixels that got a label), ``per_class_precision``
    (None for a class never labelled) and ``per_class_labelled`` (pixel counts). Images
    without a label file (unreadable ones, under ``on_corrupt: skip``) are left out.
    """
    n = int(dataset.num_classes)
    correct = np.zeros(n, dtype=np.int64)
    labelled = np.zeros(n, dtype=np.int64)
    pixels = 0
    for i, name in enumerate(dataset.names):
        path = label_path(label_dir, name)
        if not path.is_file():
            continue
        with Image.open(path) as im:
            pl = np.asarray(im)
        gt = resize_label(dataset.read_label_native(i), (pl.shape[1], pl.shape[0]))
        valid = gt != IGNORE_INDEX
        pixels += int(valid.sum())
        pl, gt = pl[valid], gt[valid]
        labelled += np.bincount(pl[pl < n], minlength=n)[:n]
        correct += np.bincount(pl[(pl < n) & (pl == gt)], minlength=n)[:n]
    names = list(getattr(getattr(dataset, "table", None), "names", [str(c) for c in range(n)]))
    return {
        "precision": round(100.0 * correct.sum() / labelled.sum(), 2) if labelled.sum() else None,
        "labelled_fraction": round(100.0 * labelled.sum() / pixels, 2) if pixels else None,
        "per_class_precision": {names[c]: (round(100.0 * correct[c] / labelled[c], 2) if labelled[c] else None)
                                for c in range(n)},
        "per_class_labelled": {names[c]: int(labelled[c]) for c in range(n)},
    }


def pseudo_label_set_complete(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished pseudo-label set (COMPLETE and stats.json)."""
    root = Path(out_dir)
    return (root / COMPLETE_NAME).is_file() and (root / STATS_NAME).is_file()


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Cityscapes colours for the first 19 classes, then a fixed bit-interleaved palette."""
    colors = list(CITYSCAPES_COLORS[:num_classes])
    for i in range(len(colors), num_classes):
        r = g = b = 0
        v = i + 1
        for shift in range(7, -1, -1):
            r |= ((v >> 0) & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        colors.append((r, g, b))
    return colors


def colorize(label: np.ndarray, colors: Sequence[Sequence[int]]) -> Image.Image:
    """A palette PNG image of a trainId map; 255 (ignore) is black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i, c in enumerate(list(colors)[:IGNORE_INDEX]):
        palette[i] = [int(v) for v in c[:3]]
    img = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    img.putpalette(palette.reshape(-1).tolist())  # turns the "L" image into a "P" image
    return img


def _save_png(path: Path, img: Image.Image) -> None:
    write_with(path, lambda tmp: img.save(tmp, format="PNG"))


def _prepare_dir(out: Path) -> None:
    """Make ``out`` an empty pseudo-label folder, clearing a previous (stale) set."""
    if out.exists() and not out.is_dir():
        raise UserError(f"pseudo-label output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER_NAME).is_file():
            raise UserError(f"refusing to clear {out}: it is not empty and holds no pseudo-label set "
                            f"(no {MARKER_NAME})")
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


# ---------------------------------------------------------------------------------------
# Generation


def _collate(items: list[dict[str, Any]]) -> tuple[Tensor | None, list[str], list[str]]:
    """(images, their names, names of unreadable samples left out of the batch)."""
    skipped = [item["skipped"] for item in items if "skipped" in item]
    items = [item for item in items if "skipped" not in item]
    names = [item["name"] for item in items]
    if not items:
        return None, names, skipped
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) != 1:
        raise DataError(f"images of one batch differ in size ({', '.join(names)}): {sorted(shapes)}")
    return torch.stack([item["image"] for item in items]), names, skipped


class _Subset(torch.utils.data.Dataset):
    """The samples at ``indices``. For training, a dataset with ``on_corrupt: skip`` answers an
    unreadable sample with the next readable one; here each image is taken only as itself
    (``item_or_none``), so it is labelled once, under its own name, and an unreadable one gets
    no label."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        j = self.indices[i]
        only_itself = getattr(self.dataset, "item_or_none", None)
        if only_itself is None:
            return self.dataset[j]
        item = only_itself(j)
        return {"skipped": self.dataset.names[j % len(self.dataset)]} if item is None else item


def target_probabilities(model: nn.Module, images: Tensor, amp_dtype: torch.dtype | None = None) -> Tensor:
    """Softmax of the target-path logits upsampled (bilinear, align_corners) to the input size."""
    ctx = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with ctx:
        logits, _ = model(images)
    logits = F.interpolate(logits.float(), size=tuple(images.shape[-2:]), mode="bilinear", align_corners=True)
    return torch.softmax(logits, dim=1)


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

    def probabilities(self, desc: str) -> Iterator[tuple[Tensor, list[str]]]:
        loader = torch.utils.data.DataLoader(_Subset(self.dataset, self.order), batch_size=self.batch_size,
                                             shuffle=False, num_workers=self.num_workers, collate_fn=_collate,
                                             pin_memory=self.device.type == "cuda",
                                             worker_init_fn=worker_init(self.num_workers))
        with loader_iterator(loader) as batches:
            for images, names, skipped in tqdm(batches, total=len(loader), desc=desc, unit="batch",
                                               disable=not self.progress, leave=False):
                self.skipped.update(skipped)
                if images is not None:
                    yield target_probabilities(self.model, images.to(self.device, non_blocking=True),
                                               self.amp_dtype), names


def _estimate(run: _Run, num_classes: int | None, **est_args: Any) -> ThresholdEstimator:
    """Run the estimation pass(es); the class count comes from the model output if not given."""
    est = ThresholdEstimator(num_classes, device=run.device, **est_args) if num_classes else None
    passes = 1 if est_args["mode"] == "histogram" else 2
    for k in range(passes):
        if est is not None:
            est.begin_pass(k)
        for prob, _ in run.probabilities(f"pseudo labels: thresholds {k + 1}/{passes}"):
            if est is None:
                est = ThresholdEstimator(prob.shape[1], device=run.device, **est_args)
                est.begin_pass(0)
            est.update(prob)
        if est is None:
            raise DataError("no images to pseudo-label")
        est.finish_pass()
    assert est is not None
    return est


def _write_labels(run: _Run, thresholds: Tensor, out: Path, palette: Sequence[Sequence[int]],
                  previews: int) -> tuple[Tensor, int]:
    """Write every label PNG (and the first ``previews`` colour previews); return the
    per-class labelled pixel counts (last entry: ignored pixels) and the image count."""
    num_classes = thresholds.numel()
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=run.device)
    seen: set[Path] = set()
    writer = _Writer()
    try:
        for prob, names in run.probabilities("pseudo labels: writing"):
            labels = select_labels(prob, thresholds)
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


def _gather_names(names: set[str], distributed: bool) -> list[str]:
    """The sorted union of ``names`` over all ranks."""
    if not distributed:
        return sorted(names)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(names))
    return sorted(set().union(*everyone))


def generate_pseudo_labels(model: nn.Module, dataset: Any, out_dir: str | Path, *, portion: float,
                           cap: float = 0.9, mode: str = "histogram", bins: int = 65536, subsample: int = 4,
                           device: torch.device | str = "cpu", batch_size: int = 1,
                           amp_dtype: torch.dtype | None = None, preview_count: int = 8,
                           colors: Sequence[Sequence[int]] | None = None, indices: Sequence[int] | None = None,
                           progress: bool = True, num_workers: int = 0,
                           num_classes: int | None = None) -> dict[str, Any]:
    """Write class-balanced pseudo labels for ``dataset`` into ``out_dir``; return the stats.

    ``dataset[i]`` gives ``{"image": FloatTensor 3 x H x W (resized, normalised), "name": str}``.
    Writes ``<name>.png`` (uint8 trainIds, 255 ignore) per image, colour previews of the first
    ``preview_count`` images in ``preview/``, ``stats.json`` and finally ``COMPLETE``. A folder
    holding an earlier (possibly partial) set is cleared first. Under torch.distributed each
    rank passes its own ``indices``; thresholds are summed over all ranks, each rank writes
    its own labels (rank 0 its previews), and rank 0 writes the stats and the marker after a
    barrier. ``num_classes`` defaults to ``model.segmentor.num_classes``.
    """
    start = time.time()
    _check_portion(portion)
    if mode not in MODES:
        raise UserError(f"unknown pseudo-label mode {mode!r} (choose {' or '.join(MODES)})")
    if not float(cap) > 0.0:
        raise UserError(f"pseudo-label cap must be > 0, got {cap}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    distributed = _dist_ready()
    rank = dist.get_rank() if distributed else 0
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if not order and not distributed:
        raise DataError("no images to pseudo-label")
    if num_classes is None:
        num_classes = int(getattr(getattr(model, "segmentor", None), "num_classes", 0)) or None
    out = Path(out_dir)
    if rank == 0:
        _prepare_dir(out)
    if distributed:
        dist.barrier()

    device = torch.device(device)
    run = _Run(model, dataset, order, batch_size, num_workers, device, amp_dtype, progress and rank == 0)
    modes = [(m, m.training) for m in model.modules()]  # restored exactly afterwards
    model.eval().to(device)
    try:
        with torch.no_grad():
            est = _estimate(run, num_classes, portion=portion, mode=mode, bins=bins, subsample=subsample)
            thresholds = est.thresholds(portion, cap)
            palette = list(colors) if colors else default_palette(est.num_classes)
            if len(palette) < est.num_classes:
                raise UserError(f"{len(palette)} colours given for {est.num_classes} classes")
            counts, written = _write_labels(run, thresholds, out, palette, preview_count if rank == 0 else 0)
    finally:
        for m, training in modes:
            m.training = training

    totals = torch.cat([counts, torch.tensor([written], dtype=torch.int64, device=device)])
    if distributed:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        dist.barrier()
    *selected, ignored, num_images = (int(v) for v in totals.tolist())
    if num_images == 0:
        raise DataError(f"no readable image to pseudo-label ({len(run.skipped)} unreadable)")
    all_pixels = sum(selected) + ignored
    stats: dict[str, Any] = {
        "thresholds": [float(v) for v in thresholds.cpu().tolist()],
        "portion": float(portion),
        "cap": float(cap),
        "mode": mode,
        "bins": int(bins) if mode == "histogram" else None,
        "subsample": int(subsample),
        "forward_passes": est.passes + 1,
        "predicted_pixels": [int(v) for v in est.counts.tolist()],
        "sampled_pixels": [int(v) for v in est.selected_counts.tolist()],
        "selected_pixels": selected,
        "ignored_fraction": ignored / all_pixels if all_pixels else 0.0,
        "num_images": num_images,
        "skipped": _gather_names(run.skipped, distributed),
        "seconds": round(time.time() - start, 3),
    }
    if rank == 0:
        write_json(out / STATS_NAME, stats)
        write_text(out / COMPLETE_NAME, json.dumps({"num_images": num_images}) + "\n")
    if distributed:
        dist.barrier()
    return stats
