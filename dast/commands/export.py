"""``dast export``: write the deployable target model as an ONNX file."""

from __future__ import annotations

import argparse

from dast.commands._common import checkpoint_file, examples
from dast.models.io import load_networks

FORMATS = ("onnx",)


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Export the deployable target model. The ONNX graph takes 'image' (N x 3 x H x W, "
        "normalised as the checkpoint's norm says) and returns 'logits' (N x C x h x w) and 'attention' "
        "(N x 1 x h x w); batch, height and width are dynamic.",
        epilog=examples(
            "dast export --checkpoint runs/mine/final/model.safetensors --format onnx --out mine.onnx --verify"
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="dast checkpoint (.safetensors), or a finished run directory (its final model)",
    )
    p.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default onnx)")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument(
        "--verify", action="store_true", help="run the file with onnxruntime at two sizes and compare with PyTorch"
    )
    return p


def run(args: argparse.Namespace) -> int:
    from dast.inference.export import PARITY_ATOL, export_onnx, onnx_parity  # noqa: PLC0415 - lazy: keeps dast --help fast

    ckpt = checkpoint_file(args.checkpoint)
    nets, _, _ = load_networks(ckpt, "cpu")
    path = export_onnx(nets, args.out, opset=args.opset)
    print(f"wrote {path} (opset {args.opset})")
    if args.verify:
        worst = onnx_parity(nets, path)
        line = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        print(f"onnxruntime vs PyTorch, max abs difference: {line}")
        if max(worst.values()) > PARITY_ATOL:
            raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by more than {PARITY_ATOL:g} ({line})")
    return 0
