"""Does the fast mode change results? Train twice from the same weights on the same batches.

Run A uses ``eager-fp32`` (the released code's way); run B uses the fast mode (bf16
autocast, D(f_t) reused, foreach optimisers; on CUDA also channels_last and the CUDA-graph
step); run C (the control, ``fast-fp32`` by default) is the fast mode without bf16, so it
differs from A by rounding only and shows how chaotic each loss is. All see the same
synthetic street scenes (``dast.data.synthetic``) in the same order, at the released
learning rates. Prints one JSON object:

* per loss: the first-step values of both runs and their relative difference (same
  weights, same inputs: only the precision differs), and the largest difference between
  the runs' means over consecutive windows of ``--window`` steps, relative to
  ``max(|eager mean|, --atol-floor)``; a loss passes when the first-step difference is
  within ``--first-rtol`` and every window within ``--window-rtol`` or within
  ``--control-factor`` times the control run's own worst window
  (:mod:`dast.benchmarking.agreement`);
* inference: from run A's final weights, the fraction of pixels where the fast inference
  modes give the same class as eager fp32, at the evaluation resolution: the shipped one
  (``--inference-mode``, default ``fast-fp32``: TF32, channels_last and a CUDA graph on
  CUDA) must reach ``--min-agreement`` (default 0.995); the bf16 one (``--fast-mode``) is
  reported alongside.

Exit status 0 when everything passes, 1 otherwise.

    python benchmarks/fast_vs_eager.py --device cpu                 # small arch, 256x144 + 256x128
    python benchmarks/fast_vs_eager.py --device cuda --size paper --arch resnet101
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from dast.atomic import write_json, write_text
from dast.benchmarking.agreement import LossTolerance, compare_losses, pixel_agreement
from dast.benchmarking.modes import TrainingSetup, build_nets, resolve_mode
from dast.benchmarking.workloads import SIZES, infer_fn

try:
    from dast.data.synthetic import NUM_CLASSES, generate_scene
except ModuleNotFoundError as exc:  # PyYAML is only needed to write dataset folders, not to draw scenes
    if exc.name != "yaml":
        raise
    import types

    sys.modules["yaml"] = types.ModuleType("yaml")
    from dast.data.synthetic import NUM_CLASSES, generate_scene
from dast.data.transforms import normalize
from dast.models.target_model import TargetModel
from dast.training.levers import to_channels_last


def scenes(domain: str, count: int, size: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` synthetic scenes as (N x 3 x H x W ImageNet-normalised images, N x H x W labels)."""
    images, labels = [], []
    for i in range(count):
        img, lab = generate_scene(domain, i, seed, size)
        images.append(normalize(img, "imagenet"))
        labels.append(torch.from_numpy(np.asarray(lab, dtype=np.int64)))
    return torch.stack(images), torch.stack(labels)


def train(
    mode_name: str,
    nets: Any,
    device: torch.device,
    overrides: dict[str, Any],
    data: dict[str, torch.Tensor],
    steps: int,
) -> tuple[TrainingSetup, dict[str, list[float]], float]:
    """Run ``steps`` iterations (stage 1 of the config with ``overrides``); return the setup,
    every loss per step and ms per step."""
    setup = TrainingSetup(resolve_mode(mode_name, device), nets, device, overrides=overrides)
    k = data["xs"].shape[0]
    xs = [setup.prepare_images(data["xs"][i : i + 1]) for i in range(k)]
    ys = [data["ys"][i : i + 1].to(device) for i in range(k)]
    xt = [setup.prepare_images(data["xt"][i : i + 1]) for i in range(k)]
    history: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i in range(steps):
        out, applied = setup.step(i, xs[i % k], ys[i % k], xt[i % k], None)
        if not applied:
            raise RuntimeError(f"{mode_name}: non-finite loss at step {i}")
        for key, v in out.items():
            if key.startswith("loss/"):
                history.setdefault(key, []).append(float(v))
    ms = (time.perf_counter() - t0) * 1000.0 / max(steps, 1)
    return setup, history, ms


def inference_agreement(
    setup: TrainingSetup, fast_mode: str, device: torch.device, images: torch.Tensor, out_size: tuple[int, int]
) -> dict[str, Any]:
    """Pixel agreement between fp32 and fast-mode predictions from the same weights."""
    fp32_mode, fmode = resolve_mode("eager-fp32", device), resolve_mode(fast_mode, device)
    ref_model = TargetModel(setup.segmentor, setup.discoverer).eval()
    fast_model = copy.deepcopy(ref_model).eval()
    if fmode.channels_last:
        to_channels_last(fast_model)
    ref_fn = infer_fn(ref_model, fp32_mode, device, out_size)
    fast_fn = infer_fn(fast_model, fmode, device, out_size)

    def fast_input(i: int) -> torch.Tensor:
        x = images[i : i + 1].to(device)
        return x.contiguous(memory_format=torch.channels_last) if fmode.channels_last else x

    if fmode.cuda_graph:
        for _ in range(3):  # two eager warm-up calls, then the capture: later calls replay
            fast_fn(fast_input(0))
    want = torch.cat([ref_fn(images[i : i + 1].to(device)).clone() for i in range(images.shape[0])])
    got = torch.cat([fast_fn(fast_input(i)).clone() for i in range(images.shape[0])])
    return {"agreement": pixel_agreement(want, got), "pixels": want.numel()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: paper on CUDA, small on the CPU")
    ap.add_argument("--arch", default=None, help="default: resnet101 on CUDA, small on the CPU")
    ap.add_argument("--variant", choices=["reference", "paper"], default="reference")
    ap.add_argument("--fast-mode", default="fast", help="the mode compared with eager-fp32 (default fast)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batches", type=int, default=8, help="distinct source/target batches, cycled (default 8)")
    ap.add_argument("--lr", type=float, default=None, help="segmentor learning rate (default 2.5e-4, as released)")
    ap.add_argument("--lr-d", type=float, default=None, help="discriminator learning rate (default 1e-4 as released)")
    dflt = LossTolerance()
    ap.add_argument("--window", type=int, default=dflt.window)
    ap.add_argument("--first-rtol", type=float, default=dflt.first_rtol)
    ap.add_argument("--window-rtol", type=float, default=dflt.window_rtol)
    ap.add_argument("--atol-floor", type=float, default=dflt.atol_floor, help="denominator floor for small losses")
    ap.add_argument(
        "--control",
        default="fast-fp32",
        help="a third run that differs from eager-fp32 by rounding only, or 'none' (default fast-fp32)",
    )
    ap.add_argument("--control-factor", type=float, default=dflt.control_factor)
    ap.add_argument("--min-agreement", type=float, default=0.995)
    ap.add_argument(
        "--inference-mode",
        default="fast-fp32",
        help="the shipped fast inference mode, held to --min-agreement (default fast-fp32: bf16 "
        "inference is opt-in; its agreement is reported too)",
    )
    ap.add_argument("--eval-images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--history", default=None, help="write every step's losses of both runs here (JSON)")
    args = ap.parse_args(argv)

    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = args.size or ("paper" if device.type == "cuda" else "small")
    arch = args.arch or ("resnet101" if size == "paper" else "small")
    sizes = SIZES[size]
    schedule: dict[str, Any] = {"train": {}, "adversarial": {}}  # the config's learning rates unless given
    if args.lr is not None:
        schedule["train"]["lr"] = args.lr
    if args.lr_d is not None:
        schedule["adversarial"]["lr"] = args.lr_d
    t0 = time.perf_counter()
    xs, ys = scenes("source", args.batches, sizes.source, args.seed)
    xt, _ = scenes("target", args.batches, sizes.target, args.seed)
    eval_x, _ = scenes("target", args.eval_images, sizes.target, args.seed + 1)
    data = {"xs": xs, "ys": ys, "xt": xt}

    nets = build_nets(arch, NUM_CLASSES, args.variant, args.seed)
    eager, hist_a, ms_a = train("eager-fp32", copy.deepcopy(nets), device, schedule, data, args.steps)
    fast, hist_b, ms_b = train(args.fast_mode, copy.deepcopy(nets), device, schedule, data, args.steps)
    del fast
    hist_c: dict[str, list[float]] | None = None
    ms: dict[str, float] = {"eager-fp32": round(ms_a, 2), args.fast_mode: round(ms_b, 2)}
    if args.control != "none":
        control, hist_c, ms_c = train(args.control, copy.deepcopy(nets), device, schedule, data, args.steps)
        del control
        ms[args.control] = round(ms_c, 2)
    tol = LossTolerance(args.first_rtol, args.window, args.window_rtol, args.atol_floor, args.control_factor)
    losses = compare_losses(hist_a, hist_b, tol, hist_c)
    inference = {}
    for mode in dict.fromkeys([args.inference_mode, args.fast_mode]):
        agree = inference_agreement(eager, mode, device, eval_x, sizes.infer_out)
        inference[mode] = {
            "agreement": round(agree["agreement"], 6),
            "pixels": agree["pixels"],
            "settings": resolve_mode(mode, device).describe(),
            "meets_min_agreement": agree["agreement"] >= args.min_agreement,
        }
    pass_training = all(v["pass"] for v in losses.values())
    pass_inference = inference[args.inference_mode]["meets_min_agreement"]
    report = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "arch": arch,
        "variant": args.variant,
        "size": size,
        "source_size": list(sizes.source),
        "target_size": list(sizes.target),
        "steps": args.steps,
        "lr": eager.config.train.lr,
        "fast_mode": args.fast_mode,
        "fast_settings": resolve_mode(args.fast_mode, device).describe(),
        "control_mode": args.control,
        "tolerance": tol.as_dict(),
        "min_agreement": args.min_agreement,
        "inference_mode": args.inference_mode,
        "losses": losses,
        "inference": inference,
        "ms_per_step_incl_loss_readback": ms,
        "seconds": round(time.perf_counter() - t0, 1),
        "pass_training": pass_training,
        "pass_inference": pass_inference,
        "pass": pass_training and pass_inference,
    }
    if args.history:
        write_json(
            args.history,
            {"eager-fp32": hist_a, args.fast_mode: hist_b, **({args.control: hist_c} if hist_c is not None else {})},
        )
    text = json.dumps(report)
    print(text, flush=True)
    if args.out:
        write_text(args.out, text + "\n")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
