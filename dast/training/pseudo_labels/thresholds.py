"""Class-balanced thresholds and labelling rules: the tensor maths of pseudo labels.

No files and no model here. Given softmax probabilities ``p`` (N x C x H x W), the
released selection is:

1. for each class ``c``, take the max-probability of the pixels predicted as ``c``
   (``argmax``, first index on ties), keeping every ``subsample``-th one per image (elements
   0, s, 2s, ... of that class's pixels in row-major order), concatenated over images and
   sorted descending;
2. ``t_c`` is the value at position ``floor(n_c * q) - 1``, capped at ``cap``; a class with
   ``floor(n_c * q) == 0`` keeps ``t_c = 1``;
3. a labelling rule (:data:`RULES`) turns ``p`` and ``t`` into labels, 255 = ignored:

   * ``"ratio"`` (released, CBST): ``argmax_c p_c / t_c``, ignored where ``max_c p_c / t_c < 1``;
     it can give a pixel another class than its argmax;
   * ``"threshold"``: ``argmax_c p_c``, ignored where ``p_argmax < t_argmax``; it never
     changes a pixel's class.

:func:`sorted_list_confidences` / :func:`sorted_list_thresholds` are the released sorted
lists (numpy, O(n) memory). :class:`ThresholdEstimator` streams the same thresholds with
per-class histograms whose size does not depend on the number of images:

* ``"histogram"``: one pass, ``bins`` uniform bins on [0, 1]; the threshold is the lower
  edge of the bin holding the selected value, so ``0 <= t_exact - t_hist < 1 / bins``
  (plus at most one float32 rounding of the edge when ``bins`` is not a power of two).
* ``"exact-reference"``: a two-pass radix select over the float32 bit patterns (high 16
  bits, then the low 16 bits inside the chosen bucket); equal bit for bit to the sorted list.

See ``docs/pseudo_labels.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dast.constants import IGNORE_INDEX
from dast.errors import UserError

MODES = ("histogram", "exact-reference")
RULES = ("ratio", "threshold")
_RADIX = 1 << 16


def check_portion(portion: float) -> None:
    """A portion must lie in (0, 1]."""
    if not 0.0 < float(portion) <= 1.0:
        raise UserError(f"pseudo-label portion must be in (0, 1], got {portion}")


def check_mode(mode: str) -> None:
    """``mode`` must be one of :data:`MODES`."""
    if mode not in MODES:
        raise UserError(f"unknown pseudo-label mode {mode!r} (choose {' or '.join(MODES)})")


def check_rule(rule: str) -> None:
    """``rule`` must be one of :data:`RULES`."""
    if rule not in RULES:
        raise UserError(f"unknown pseudo-label rule {rule!r} (choose {' or '.join(RULES)})")


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
# Labelling rules


def select_labels(prob: Tensor, thresholds: Tensor, rule: str = "ratio") -> Tensor:
    """Pseudo labels (uint8 N x H x W, 255 ignored) of ``prob`` under ``rule``.

    ``"ratio"``: ``argmax(p / t)``, 255 where ``max(p / t) < 1`` (released).
    ``"threshold"``: ``argmax(p)``, 255 where ``p_argmax < t_argmax``.
    The two differ exactly at the pixels ``"ratio"`` gives another class than their argmax,
    which needs that class's threshold below 1/2.
    """
    check_rule(rule)
    t = thresholds.to(device=prob.device, dtype=torch.float32)
    if rule == "ratio":
        best, label = torch.max(prob.float() / t.view(1, -1, 1, 1), dim=1)
        return label.masked_fill_(best < 1, IGNORE_INDEX).to(torch.uint8)
    conf, label = torch.max(prob.float(), dim=1)
    return label.masked_fill_(conf < t[label], IGNORE_INDEX).to(torch.uint8)


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

    def __init__(
        self,
        num_classes: int,
        *,
        portion: float | None = None,
        mode: str = "histogram",
        bins: int = 65536,
        subsample: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        check_mode(mode)
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise UserError(f"pseudo labels need 1..{IGNORE_INDEX} classes, got {num_classes}")
        if int(subsample) < 1:
            raise UserError(f"pseudo-label subsample must be >= 1, got {subsample}")
        if mode == "histogram" and int(bins) < 1:
            raise UserError(f"pseudo-label bins must be >= 1, got {bins}")
        if portion is not None:
            check_portion(portion)
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
            assert self.portion is not None  # the constructor requires it in this mode
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

    def _selected_k(self, portion: float) -> Tensor:
        q = float(portion)
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
        check_portion(portion)
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
