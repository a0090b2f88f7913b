"""The paper's evaluation protocol, for a model or for prediction files.

The model sees the images resized to the dataset's ``size`` (1024x512 for Cityscapes);
its logits are upsampled bilinearly (``align_corners=True``) to the native label
resolution (2048x1024), the argmax is compared with the full-resolution labels, and the
confusion matrix is accumulated on the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dast.constants import IGNORE_INDEX
from dast.contexts import autocast, eval_mode
from dast.data.datasets import SegmentationDataset, require_named_pngs
from dast.data.labels import ClassTable, protocols_for
from dast.data.readers import read_index_label
from dast.data.workers import loader_iterator, worker_init
from dast.errors import DataError
from dast.evaluation.confusion import ConfusionMatrix
from dast.evaluation.metrics import compute_metrics
from dast.execution import Execution
from dast.losses import upsample
from dast.progress import progress as report_progress


class LabelledImages(Protocol):
    """What a model evaluation reads of a dataset: a labelled
    :class:`~dast.data.datasets.SegmentationDataset`, or the FDA model-selection sets."""

    @property
    def kind(self) -> str: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def has_labels(self) -> bool: ...
    @property
    def table(self) -> ClassTable: ...
    def __len__(self) -> int: ...
    def prepare_image(self, i: int) -> torch.Tensor: ...
    def read_label_native(self, i: int) -> np.ndarray: ...


class _EvalView(Dataset):
    """(network input, native label, index) for the evaluated samples."""

    def __init__(self, dataset: LabelledImages, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        i = self.indices[k]
        label = torch.from_numpy(np.array(self.dataset.read_label_native(i)))  # a writable copy
        return self.dataset.prepare_image(i), label, i


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _require_labels(dataset: LabelledImages) -> None:
    if not dataset.has_labels:
        raise DataError(f"the {dataset.kind} dataset was built without labels; evaluation needs them")


@torch.no_grad()
def evaluate_confusion(
    model: nn.Module, dataset: LabelledImages, execution: Execution | None = None, *, desc: str = "evaluating"
) -> tuple[ConfusionMatrix, int]:
    """Run ``model`` over ``dataset`` (or the execution's ``indices``) and return (confusion matrix, images)."""
    _require_labels(dataset)
    ex = execution or Execution()
    device, batch_size, num_workers, amp_dtype = ex.torch_device, ex.batch_size, ex.num_workers, ex.amp_dtype
    idx = ex.order(len(dataset))
    cm = ConfusionMatrix(dataset.num_classes, device)
    loader = DataLoader(
        _EvalView(dataset, idx),
        batch_size=max(1, batch_size),
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_list,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init(num_workers),
    )
    count = 0
    with eval_mode(model):  # every submodule's own mode comes back (a round may train with frozen BatchNorm)
        with loader_iterator(loader) as batches:
            bar = report_progress(batches, total=len(loader), desc=desc, unit="batch", enabled=ex.progress)
            for batch in bar:
                start = 0
                while start < len(batch):  # images of one forward pass must share a size
                    end = start + 1
                    shape = batch[start][0].shape
                    while end < len(batch) and batch[end][0].shape == shape:
                        end += 1
                    group = batch[start:end]
                    x = torch.stack([g[0] for g in group]).to(device, non_blocking=True)
                    with autocast(device, amp_dtype):
                        logits = _logits(model(x))
                    for k, (_, label, _) in enumerate(group):
                        up = upsample(logits[k : k + 1].float(), tuple(label.shape))
                        cm.update(up.argmax(1)[0], label.to(device, non_blocking=True), check=False)
                    count += len(group)
                    start = end
    return cm, count


def _reduce_count(count: int, device: torch.device) -> int:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())
    return count


def evaluate_model(
    model: nn.Module,
    dataset: LabelledImages,
    execution: Execution | None = None,
    *,
    protocols: Mapping[str, Sequence[int]] | None = None,
    distributed: bool = False,
    desc: str = "evaluating",
) -> dict[str, Any]:
    """mIoU of a target model (already on the execution's device) on a labelled dataset
    (keys: :func:`compute_metrics`).

    ``execution.indices`` restricts the evaluation to a shard; with ``distributed=True``
    every rank must call this with its own shard and all get the metrics of the union.
    ``protocols`` defaults to those of ``dataset.kind`` (16/13 classes for SYNTHIA).
    """
    cm, count = evaluate_confusion(model, dataset, execution, desc=desc)
    if distributed:
        cm.all_reduce()
        count = _reduce_count(count, cm.device)
    chosen = protocols_for(dataset.kind) if protocols is None else protocols
    return compute_metrics(cm.numpy(), dataset.table.names, chosen, count)


def _read_prediction(path: Path, num_classes: int, label_shape: tuple[int, ...], name: str) -> np.ndarray:
    pred = read_index_label(path, num_classes)
    if (pred == IGNORE_INDEX).any():
        raise DataError(f"prediction {path} contains 255; predictions must be class ids 0..{num_classes - 1}")
    if pred.shape != label_shape:
        raise DataError(
            f"prediction {path} is {pred.shape[1]}x{pred.shape[0]} but the label of {name} is "
            f"{label_shape[1]}x{label_shape[0]}"
        )
    return pred


def evaluate_predictions(
    dataset: SegmentationDataset,
    pred_dir: str | Path,
    *,
    progress: bool = True,
    protocols: Mapping[str, Sequence[int]] | None = None,
    workers: int = 4,
) -> dict[str, Any]:
    """mIoU of train-id prediction PNGs ``<pred_dir>/<name>.png`` at the native label size."""
    _require_labels(dataset)
    d = require_named_pngs(pred_dir, dataset.names, "prediction")
    n = dataset.num_classes

    def load(i: int) -> tuple[np.ndarray, np.ndarray]:
        label = dataset.read_label_native(i)
        name = dataset.names[i]
        return _read_prediction(d / f"{name}.png", n, label.shape, name), label

    cm = ConfusionMatrix(n, "cpu")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pairs = pool.map(load, range(len(dataset)))
        for pred, label in report_progress(pairs, total=len(dataset), desc="evaluating", enabled=progress):
            cm.update(pred, label)
    chosen = protocols_for(dataset.kind) if protocols is None else protocols
    return compute_metrics(cm.numpy(), dataset.table.names, chosen, len(dataset))
