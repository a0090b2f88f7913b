"""Measure the domain gap of the synthetic demo domains: source-only versus oracle.

Trains the small segmentor (``paper`` variant, ``unit`` input norm, ``--output-stride``)
once on labelled source scenes ("source_only") and once on labelled target scenes
("oracle") with the same budget, then evaluates both on held-out target scenes of the
same ``--shift``. Prints one JSON object (and writes it to ``--out`` if given).

    python benchmarks/synthetic_gap.py --seeds 0 1 2 --size 128 64 --steps 800 --shift appearance

(The demo's own oracle and source-only runs, with the demo's optimiser, are measured with
``dast train``; see docs/synthetic.md.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dast.atomic import write_json
from dast.data.synthetic import DEFAULT_SHIFT, SHIFTS, SYNTHETIC_CLASSES, generate_scene
from dast.data.transforms import normalize
from dast.models import build_segmentor

NUM_CLASSES = len(SYNTHETIC_CLASSES)
TEST_OFFSET = 100_000  # held-out scene indices start here


def make_set(
    domain: str, start: int, count: int, seed: int, size: tuple[int, int], shift: str = DEFAULT_SHIFT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes ``start .. start+count-1`` of ``domain`` as (N x 3 x H x W float, N x H x W long)."""
    imgs, labels = [], []
    for i in range(start, start + count):
        img, label = generate_scene(domain, i, seed, size, shift)
        imgs.append(normalize(img, "unit"))
        labels.append(torch.from_numpy(label.astype(np.int64)))
    return torch.stack(imgs), torch.stack(labels)


def train(
    x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int, output_stride: int | None = None
) -> tuple[torch.nn.Module, float]:
    """Adam with poly decay, cross-entropy on logits upsampled to the label size, random flips."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_segmentor("small", NUM_CLASSES, "paper", output_stride).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1.0 - step / steps) ** 0.9
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        if torch.rand((), generator=gen) < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        logits = F.interpolate(model(xb), size=yb.shape[-2:], mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, yb, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, time.perf_counter() - start


def confusion(gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """K x K confusion matrix (rows: ground truth, columns: prediction), 255 ignored."""
    valid = gt != 255
    return torch.bincount(gt[valid] * NUM_CLASSES + pred[valid], minlength=NUM_CLASSES**2).view(
        NUM_CLASSES, NUM_CLASSES
    )


def scores(conf: torch.Tensor) -> dict[str, object]:
    """mIoU (0-100, nanmean over classes) and per-class IoU."""
    conf_f = conf.double()
    inter = conf_f.diag()
    union = conf_f.sum(0) + conf_f.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    per_class = {name: round(100.0 * float(v), 2) for (name, _), v in zip(SYNTHETIC_CLASSES, iou)}
    return {"miou": round(100.0 * float(np.nanmean(iou.numpy())), 2), "per_class": per_class}


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    """Scores of ``model`` (in eval mode) on (x, y), logits upsampled bilinearly to the label size."""
    model.eval()
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for i in range(0, x.shape[0], 16):
        logits = model(x[i : i + 16])
        pred = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=True).argmax(1)
        conf += confusion(y[i : i + 16], pred)
    return scores(conf)


def location_prior(train_y: torch.Tensor, test_y: torch.Tensor) -> dict[str, object]:
    """A layout-only baseline: every pixel gets its most frequent training class."""
    hist = F.one_hot(train_y.clamp(max=NUM_CLASSES - 1), NUM_CLASSES).sum(0)  # H x W x K
    pred = hist.argmax(-1).expand_as(test_y)
    return scores(confusion(test_y, pred))


def uniform_chance(test_y: torch.Tensor) -> float:
    """Expected mIoU (0-100) of predicting each pixel uniformly at random."""
    k = NUM_CLASSES
    freq = torch.bincount(test_y[test_y != 255], minlength=k).double()
    p = freq / freq.sum()
    iou = (p / k) / (1.0 / k + p - p / k)
    return round(100.0 * float(iou[p > 0].mean()), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("W", "H"))
    ap.add_argument("--train-count", type=int, default=200)
    ap.add_argument("--test-count", type=int, default=100)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shift", choices=SHIFTS, default=DEFAULT_SHIFT, help="the synthetic domain shift")
    ap.add_argument("--output-stride", type=int, choices=(4, 8), default=4, help="of the small segmentor (the demo: 4)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = (args.size[0], args.size[1])
    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        src_x, src_y = make_set("source", 0, args.train_count, seed, size, args.shift)
        tgt_x, tgt_y = make_set("target", 0, args.train_count, seed, size, args.shift)
        test_x, test_y = make_set("target", TEST_OFFSET, args.test_count, seed, size, args.shift)
        src_test_x, src_test_y = make_set("source", TEST_OFFSET, args.test_count, seed, size, args.shift)
        gen_s = time.perf_counter() - t0
        row: dict[str, object] = {"seed": seed, "data_seconds": round(gen_s, 2)}
        row["uniform_chance_miou"] = uniform_chance(test_y)
        row["source_location_prior_miou"] = location_prior(src_y, test_y)["miou"]
        row["target_location_prior_miou"] = location_prior(tgt_y, test_y)["miou"]
        for name, (x, y) in {"source_only": (src_x, src_y), "oracle": (tgt_x, tgt_y)}.items():
            model, secs = train(x, y, args.steps, args.batch, args.lr, seed, args.output_stride)
            res = evaluate(model, test_x, test_y)
            res["train_seconds"] = round(secs, 1)
            if name == "source_only":
                res["miou_on_source"] = evaluate(model, src_test_x, src_test_y)["miou"]
            row[name] = res
        row["gap"] = round(float(row["oracle"]["miou"]) - float(row["source_only"]["miou"]), 2)  # type: ignore[index]
        runs.append(row)
        print(json.dumps(row), flush=True)
    src = [float(r["source_only"]["miou"]) for r in runs]  # type: ignore[index]
    orc = [float(r["oracle"]["miou"]) for r in runs]  # type: ignore[index]
    report = {
        "size": list(size),
        "train_count": args.train_count,
        "test_count": args.test_count,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "threads": args.threads,
        "shift": args.shift,
        "output_stride": args.output_stride,
        "runs": runs,
        "summary": {
            "source_only_miou_mean": round(float(np.mean(src)), 2),
            "oracle_miou_mean": round(float(np.mean(orc)), 2),
            "gap_mean": round(float(np.mean(orc) - np.mean(src)), 2),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
