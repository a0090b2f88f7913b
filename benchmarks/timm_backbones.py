"""timm backbones at the demo size: parameter counts of E, P, D and C, feature channels,
native and dilated output strides, and the time of one stage-1 step.

Needs timm (``pip install 'dast[timm]'``). Random weights, nothing is downloaded. The
step is the demo's: a batch of 4 source images (with labels) and 4 target images at
128x64, 7 classes, corrector width 16, run with the ``fast-fp32`` mode (fp32, D(f_t)
computed once, foreach optimisers) as ``dast train`` runs it on a CPU. Prints one JSON
object per backbone; ``small`` (dast's own demo backbone) is the yardstick.

    python benchmarks/timm_backbones.py --threads 1
    python benchmarks/timm_backbones.py --names resnet10t,convnext_atto --iters 10
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dast.benchmarking.modes import TrainingSetup, resolve_mode
from dast.benchmarking.timing import measure
from dast.benchmarking.workloads import random_images, random_labels
from dast.models.build import count_parameters
from dast.models.io import ModelSpec, build_networks

DEFAULT_NAMES = "small,resnet10t,resnet18,efficientnet_b0,mobilenetv3_small_050,regnetx_002,convnext_atto,test_vit"
NUM_CLASSES = 7
SIZE = (128, 64)  # (width, height) of the demo's images
BATCH = 4


def native_stride(name: str) -> int | None:
    """The output stride timm gives ``name`` without dilation (None for dast's own archs)."""
    if name == "small":
        return None
    import timm  # noqa: PLC0415 - optional: timm, like the backbones themselves

    return int(timm.create_model(name, features_only=True, out_indices=(-1,)).feature_info.reduction()[-1])


def measure_backbone(name: str, iters: int, warmup: int) -> dict[str, object]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if name == "small":
        spec = ModelSpec(arch="small", num_classes=NUM_CLASSES, norm="unit", corrector_width=16)
    else:
        spec = ModelSpec(arch="timm", num_classes=NUM_CLASSES, norm="imagenet", timm_name=name, corrector_width=16)
    nets = build_networks(spec)
    build_s = time.perf_counter() - t0
    seg, disc, corr = nets.segmentor, nets.discoverer, nets.corrector
    assert disc is not None and corr is not None
    encoder = seg.encoder
    row: dict[str, object] = {
        "backbone": name,
        "params_E": count_parameters(encoder),
        "params_tail": count_parameters(seg.tail),
        "params_P": count_parameters(seg.classifier),
        "params_D": count_parameters(disc),
        "params_C": count_parameters(corr),
        "feature_channels": seg.feature_channels,
        "output_stride": int(getattr(encoder, "output_stride", 8)),
        "native_stride": native_stride(name),
        "build_s": round(build_s, 2),
    }
    device = torch.device("cpu")
    stage1 = {"train": {"lr": 0.01, "duplicate_params": False, "poly_steps": 2000}}  # the demo's stage 1
    setup = TrainingSetup(resolve_mode("fast-fp32", device), (seg, disc, corr), device, overrides=stage1)
    gen = torch.Generator().manual_seed(1)
    xs, ys = random_images(BATCH, SIZE, gen), random_labels(BATCH, SIZE, NUM_CLASSES, gen)
    xt = random_images(BATCH, SIZE, gen)
    timing = measure(lambda i: setup.step(i, xs, ys, xt, None), iters=iters, warmup=warmup, device=device)
    row.update({f"step_{k}": v for k, v in timing.summary().items()})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--names", default=DEFAULT_NAMES, help="comma-separated timm model names (and 'small')")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.names.split(","):
        row = measure_backbone(name.strip(), args.iters, args.warmup)
        row["threads"] = args.threads
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
