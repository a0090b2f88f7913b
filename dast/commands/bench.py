"""``dast bench``: time the training iteration, inference and pseudo-labelling; JSON lines."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dast.atomic import write_text
from dast.benchmarking import MODES, WHATS, BenchRequest, parse_modes, run_benchmarks
from dast.commands._common import add_device_argument, examples, nonnegative_int, positive_int, resolve_device
from dast.errors import UserError

ARCH_CHOICES = ("resnet101", "vgg16", "small")


def _list(text: str, choices: tuple[str, ...], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag} is empty")
    for t in items:
        if t not in choices:
            raise UserError(f"unknown value {t!r} in {flag}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(items))


def _batches(text: str) -> list[int]:
    out = []
    for t in text.split(","):
        t = t.strip()
        if not t.isdigit() or int(t) < 1:
            raise UserError(f"--batches takes positive whole numbers separated by commas, got {text!r}")
        out.append(int(t))
    return list(dict.fromkeys(out))


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Measure, per mode, the stage-1 iteration (step: 1280x720 source + 1024x512 target, batch 1), "
        "the stage-2 iteration with pseudo labels (step2), the online stage's iteration (step_online), "
        "target inference at 1024x512 upsampled to "
        "2048x1024 (infer) and pseudo-labelling (pseudo). Prints one JSON object per measurement: "
        "what, arch, mode, device, torch, ms_median, ms_min, ms_max, iters, peak_mem_gib, ... "
        "Networks have random weights; nothing is downloaded. Modes: "
        + "; ".join(f"{k}: {m.about}" for k, m in MODES.items())
        + ".",
        epilog=examples(
            "dast bench --device cpu --size small --threads 1",
            "dast bench --device cuda --what all --out bench.jsonl",
        ),
    )
    add_device_argument(p)
    p.add_argument(
        "--arch",
        default=None,
        metavar="A[,A]",
        help=f"architectures, comma-separated ({', '.join(ARCH_CHOICES)}); "
        "default resnet101 for --size paper, small for --size small",
    )
    p.add_argument(
        "--size",
        choices=["paper", "small"],
        default="paper",
        help="paper: the paper's resolutions; small: 256x144 + 256x128 (a CPU smoke run)",
    )
    p.add_argument(
        "--what",
        default="step",
        metavar="W[,W]",
        help=f"what to measure, comma-separated: {', '.join(WHATS)} or all (default step)",
    )
    p.add_argument(
        "--modes",
        default="eager-fp32,fast",
        metavar="M[,M]",
        help="modes to compare, comma-separated (default eager-fp32,fast)",
    )
    p.add_argument("--iters", type=positive_int, default=20, help="timed iterations (default 20)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed iterations first (default 3)")
    p.add_argument(
        "--batches",
        default=None,
        metavar="B[,B]",
        help="batch sizes for infer and pseudo (default 1,2,4,8 on CUDA, 1,2 on the CPU)",
    )
    p.add_argument(
        "--variant",
        choices=["reference", "paper"],
        default="reference",
        help="network variant (default reference: the released code's networks and stage-1 SGD)",
    )
    p.add_argument("--num-classes", type=positive_int, default=19, help="classes (default 19)")
    p.add_argument(
        "--interleave",
        choices=["auto", "on", "off"],
        default="auto",
        help="time the modes round-robin, one iteration each, so a shared machine's load affects "
        "them alike (auto: on for the CPU, off for CUDA, where all modes would share the memory)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice); 1 steadies timings on a shared machine",
    )
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON lines to FILE (atomically)")
    return p


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    whats = list(WHATS) if args.what.strip() == "all" else _list(args.what, WHATS, "--what")
    archs = (
        _list(args.arch, ARCH_CHOICES, "--arch")
        if args.arch
        else (["resnet101"] if args.size == "paper" else ["small"])
    )
    modes = parse_modes(args.modes)
    batches = _batches(args.batches) if args.batches else ([1, 2, 4, 8] if device.type == "cuda" else [1, 2])
    lines: list[str] = []
    failed = 0
    request = BenchRequest(
        device=device,
        archs=archs,
        size=args.size,
        whats=whats,
        modes=modes,
        iters=args.iters,
        warmup=args.warmup,
        batches=batches,
        variant=args.variant,
        num_classes=args.num_classes,
        interleave=None if args.interleave == "auto" else args.interleave == "on",
    )
    for row in run_benchmarks(request):
        line = json.dumps(row, sort_keys=False)
        print(line, flush=True)
        lines.append(line)
        failed += "error" in row
    if args.out:
        write_text(args.out, "\n".join(lines) + "\n")
    if failed:
        sys.stderr.write(f"{failed} measurement(s) failed; see the 'error' field of their rows\n")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dast.commands.bench ...``: the same command without importing the whole CLI
    (for machines that have torch but not every dependency of the other commands)."""
    parser = argparse.ArgumentParser(prog="dast bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub, "bench")
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
