"""Sample predictions for the report: input | attention | prediction | ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dast.config import Config, DatasetConfig
from dast.constants import IGNORE_INDEX
from dast.contexts import eval_mode
from dast.data.datasets import build_dataset
from dast.data.transforms import normalize, resize_label
from dast.inference.visualize import colorize, heatmap, palette_for, png_bytes
from dast.models.io import load_networks
from dast.models.target_model import predict_full_res

DISPLAY_WIDTH = 512  # wider images are shrunk before they are embedded


@dataclass
class Sample:
    """One image's panels as PNG bytes, and a few numbers to print under them."""

    name: str
    image: bytes
    attention: bytes
    prediction: bytes
    ground_truth: bytes | None
    attention_range: tuple[float, float]
    pixel_accuracy: float | None


@dataclass
class SampleSet:
    """The predictions of one model on the first images of a dataset."""

    dataset: str  # "val" or "target"
    samples: list[Sample] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    class_colors: list[tuple[int, int, int]] = field(default_factory=list)
    has_labels: bool = False


def _shrink(arr: np.ndarray, nearest: bool) -> np.ndarray:
    h, w = arr.shape[:2]
    if w <= DISPLAY_WIDTH:
        return arr
    size = (DISPLAY_WIDTH, max(1, round(h * DISPLAY_WIDTH / w)))
    return np.asarray(
        Image.fromarray(arr).resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
    )


def pixel_accuracy(pred: np.ndarray, label: np.ndarray) -> float | None:
    """Percentage of labelled pixels (not 255) predicted right; None when none is labelled."""
    valid = label != IGNORE_INDEX
    n = int(valid.sum())
    return float((pred[valid] == label[valid]).sum() * 100.0 / n) if n else None


def dataset_for_samples(cfg: Config) -> tuple[str, DatasetConfig, int, bool]:
    """(name, dataset config, seed, with labels) of the images the report predicts.

    The seeds match the ones ``dast train`` gives the val (seed + 2) and target (seed + 1)
    sets, so synthetic datasets show the images the run evaluated.
    """
    if cfg.val is not None:
        return "val", cfg.val, cfg.seed + 2, bool(cfg.val.with_labels)
    return "target", cfg.target, cfg.seed + 1, bool(cfg.target.with_labels)


def predict_samples(model_path: Path, cfg: Config, count: int, device: torch.device | str = "cpu") -> SampleSet:
    """Run the target path of the checkpoint on the first ``count`` images of the run's val
    set (its target set without one). Raises UserError for a bad checkpoint or dataset."""
    device = torch.device(device)
    nets, _, _ = load_networks(model_path, device)
    spec = nets.spec
    which, dcfg, seed, with_labels = dataset_for_samples(cfg)
    ds = build_dataset(dcfg, norm=spec.norm, num_classes=spec.num_classes, with_labels=with_labels, seed=seed)
    colors = palette_for(spec.num_classes, spec.class_colors or None)
    names = list(spec.class_names) or list(ds.table.names)
    out = SampleSet(dataset=which, class_names=names, class_colors=colors, has_labels=with_labels)
    model = nets.target_model()
    with eval_mode(model):
        for i in range(min(count, len(ds))):
            rgb = ds.read_image_rgb(i)
            h, w = rgb.shape[:2]
            x = normalize(rgb, spec.norm).unsqueeze(0).to(device)
            up, a = predict_full_res(model, x, (h, w))
            pred = up.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
            a_np = a[0, 0].clamp(0.0, 1.0).cpu().numpy()
            gt = resize_label(np.asarray(ds.read_label_native(i), dtype=np.uint8), (w, h)) if with_labels else None
            out.samples.append(
                Sample(
                    name=ds.names[i],
                    image=png_bytes(_shrink(np.ascontiguousarray(rgb, dtype=np.uint8), nearest=False)),
                    attention=png_bytes(_shrink(heatmap(a_np), nearest=False)),
                    prediction=png_bytes(_shrink(colorize(pred, colors), nearest=True)),
                    ground_truth=png_bytes(_shrink(colorize(gt, colors), nearest=True)) if gt is not None else None,
                    attention_range=(float(a_np.min()), float(a_np.max())),
                    pixel_accuracy=pixel_accuracy(pred, gt) if gt is not None else None,
                )
            )
    return out
