"""Peak memory and speed of pseudo-label generation at 1x, 4x and 16x an image count.

Each run happens in a fresh child process so that its peaks are its own. Prints one JSON
object per run:

    {"method", "device", "images", "size": [w, h], "num_classes", "state_mb",
     "peak_rss_delta_mb", "tracemalloc_peak_mb", "cuda_peak_mb", "images_per_s", "seconds"}

* ``peak_rss_delta_mb``: growth of the process's peak resident set (``ru_maxrss``) during
  the run, over the peak after building the model and one warm-up forward (CPU tensors
  included; the child runs with glibc's mmap threshold lowered so freed blocks leave);
* ``tracemalloc_peak_mb``: peak of the Python-heap allocations during the run (lists,
  numpy scalars, small arrays);
* ``cuda_peak_mb``: ``torch.cuda.max_memory_allocated`` during the run (CUDA only);
* ``state_mb``: the estimator's histograms.

``--with-sorted-list`` adds the released method (Python lists of per-class confidences,
sorted at the end; probability maps kept out of the picture) for comparison.

    python benchmarks/pseudo_label_memory.py --base 4 --size 256 128
    python benchmarks/pseudo_label_memory.py --device cuda --base 25 --size 1024 512 --arch resnet101
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any

import numpy as np
import torch

from dast.config import SelfTrainingConfig
from dast.execution import Execution
from dast.models import build_discoverer, build_segmentor
from dast.models.target_model import TargetModel
from dast.training.pseudo_labels import (
    ThresholdEstimator,
    generate_pseudo_labels,
    select_labels,
    sorted_list_thresholds,
    target_probabilities,
)


class RandomImages(torch.utils.data.Dataset):
    """Deterministic random images, made on demand (nothing is held per image)."""

    def __init__(self, count: int, size: tuple[int, int]) -> None:
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        w, h = self.size
        return {"image": torch.randn(3, h, w, generator=g) * 2.0, "name": f"img_{i:05d}"}


def _model(arch: str, num_classes: int, device: torch.device) -> TargetModel:
    torch.manual_seed(0)
    seg = build_segmentor(arch, num_classes)
    return TargetModel(seg, build_discoverer(seg.feature_channels)).to(device).eval()


def _sorted_list_run(
    model: TargetModel, ds: RandomImages, device: torch.device, portion: float, subsample: int
) -> None:
    """The released collection: per-class Python lists of numpy scalars, sorted at the end."""
    conf_dict: list[list[Any]] = [[] for _ in range(model.segmentor.num_classes)]
    with torch.no_grad():
        for i in range(len(ds)):
            prob = target_probabilities(model, ds[i]["image"][None].to(device))[0].cpu().numpy()
            pred, conf = prob.argmax(0), prob.max(0)
            for c in range(prob.shape[0]):
                values = conf[pred == c]
                if values.size:
                    conf_dict[c].extend(values[::subsample])
        t = torch.from_numpy(sorted_list_thresholds([np.asarray(v, np.float32) for v in conf_dict], portion))
        for i in range(len(ds)):
            prob = target_probabilities(model, ds[i]["image"][None].to(device))
            select_labels(prob, t.to(device))


def _state_mb(mode: str, num_classes: int, bins: int) -> float:
    est = ThresholdEstimator(num_classes, portion=0.5, mode=mode, bins=bins)
    for k in range(est.passes):
        est.begin_pass(k)
        est.finish_pass()
    return est.state_bytes() / 2**20


def child(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model = _model(args.arch, args.num_classes, device)
    ds = RandomImages(args.count, tuple(args.size))
    with torch.no_grad():
        target_probabilities(model, ds[0]["image"][None].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.method == "sorted-list":
            _sorted_list_run(model, ds, device, 0.5, 4)
        else:
            generate_pseudo_labels(
                model,
                ds,
                f"{tmp}/pl",
                SelfTrainingConfig(portion=0.5, estimator=args.method, bins=args.bins),
                execution=Execution(
                    device=device, batch_size=args.batch_size, progress=False, num_workers=args.num_workers
                ),
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": args.method,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "images": args.count,
        "size": list(args.size),
        "arch": args.arch,
        "num_classes": args.num_classes,
        "state_mb": None
        if args.method == "sorted-list"
        else round(_state_mb(args.method, args.num_classes, args.bins), 2),
        "peak_rss_delta_mb": round((rss1 - rss0) / 1024, 1),
        "tracemalloc_peak_mb": round(py_peak / 2**20, 2),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "images_per_s": round(args.count / seconds, 2),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="small", choices=["small", "resnet101", "vgg16"])
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("W", "H"))
    p.add_argument("--base", type=int, default=4, help="image count of the 1x run")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--methods", default="histogram,exact-reference")
    p.add_argument("--with-sorted-list", action="store_true", help="also run the released sorted-list method")
    p.add_argument("--bins", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="histogram", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    methods = [m for m in args.methods.split(",") if m] + (["sorted-list"] if args.with_sorted_list else [])
    common = [
        "--device",
        args.device,
        "--arch",
        args.arch,
        "--num-classes",
        str(args.num_classes),
        "--size",
        *map(str, args.size),
        "--bins",
        str(args.bins),
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(args.num_workers),
    ]
    # Large blocks through mmap (returned on free) and few arenas: ru_maxrss then tracks the
    # live peak instead of the allocator's high-water mark.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_ARENA_MAX="2")
    for method in methods:
        for factor in args.factors:
            count = max(1, int(math.ceil(args.base * factor)))
            cmd = [sys.executable, __file__, "--child", "--method", method, "--count", str(count), *common]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                sys.stderr.write(res.stderr)
                return res.returncode
            print(res.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
