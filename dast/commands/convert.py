"""`dast convert`: released checkpoints and ImageNet initialisations -> dast checkpoints,
and colour label images -> class-index labels.

    dast convert official --segmentor SEG.pth [--discriminators D.pth] --arch resnet101 --num-classes 19 --out CKPT
    dast convert imagenet --weights FILE --arch resnet101 [--variant paper] --out CKPT
    dast convert imagenet --weights FILE --arch timm --timm-name NAME [--output-stride N] --out CKPT
    dast convert labels --classes classes.yaml --in RGB_LABEL_DIR --out INDEX_LABEL_DIR [--ignore-color R,G,B ...]

Foreign files are read with ``torch.load(weights_only=True)``; the result is a
``.safetensors`` dast checkpoint. See docs/weights.md and docs/datasets.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dast import __version__
from dast.checkpoint import load_torch_file
from dast.commands._common import add_progress_argument, examples, existing_file, positive_int
from dast.data.label_convert import LabelConversion, convert_label_folder, parse_rgb
from dast.data.labels import read_class_file
from dast.data.transforms import NORMS
from dast.errors import UserError
from dast.models.convert import (
    CONVERT_ARCHS,
    FORMATS,
    IMAGENET_ARCHS,
    ConversionReport,
    ImportOptions,
    imagenet_to_dast,
    official_to_dast,
    timm_to_dast,
)
from dast.models.io import Networks, save_networks
from dast.models.known_weights import KNOWN_WEIGHTS, FileProvenance, KnownWeights, inspect_file

_ARCH_HELP = "backbone (small: dast's tiny demo backbone, which has no released weights)"


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Convert the authors' released checkpoints or ImageNet initialisations into a dast checkpoint, "
        "or colour label images into class-index labels.",
        epilog=examples(
            "dast convert labels --classes my_renders/classes.yaml --in my_renders/labels_colour "
            "--out my_renders/labels --ignore-color 0,0,0",
            "dast convert imagenet --weights DeepLab_resnet_pretrained_init-f81d91e8.pth --arch resnet101 "
            "--out weights/resnet101_init.safetensors",
            "dast convert <source> --help",
        ),
    )
    sub = p.add_subparsers(dest="source", metavar="<source>", parser_class=type(p))
    sub.required = True

    o = sub.add_parser(
        "official",
        help="a released DAST segmentor (and discriminators) .pth",
        description="Convert a released DAST checkpoint. The result keeps the `reference` variant.",
        epilog=examples(
            "dast convert official --segmentor GTA5_best.pth --discriminators GTA5_best_D.pth --arch resnet101 "
            "--num-classes 19 --out released.safetensors"
        ),
    )
    o.add_argument("--segmentor", required=True, metavar="SEG.pth", help="released segmentor state dict")
    o.add_argument("--discriminators", metavar="D.pth", help="released discriminators (the ModuleList of D and C)")
    o.add_argument("--arch", required=True, choices=CONVERT_ARCHS, help=_ARCH_HELP)
    o.add_argument("--num-classes", type=int, required=True, help="number of classes of the released model")
    o.add_argument(
        "--variant",
        choices=("reference", "paper"),
        default="reference",
        help="network variant to load into (default: reference, the released code's network)",
    )
    _common_flags(o)

    i = sub.add_parser(
        "imagenet",
        help="an ImageNet initialisation (DeepLab init file or torchvision weights)",
        description="Start a dast checkpoint from ImageNet weights: the DeepLab init file "
        "(DeepLab_resnet_pretrained_init-*.pth) or torchvision resnet101 / vgg16 weights. "
        "The classifier, D and C are freshly initialised.",
        epilog=examples(
            "dast convert imagenet --weights DeepLab_resnet_pretrained_init-f81d91e8.pth --arch resnet101 "
            "--out weights/resnet101_init.safetensors",
            "dast convert imagenet --arch timm --timm-name resnet50 --weights resnet50_a1.safetensors "
            "--num-classes 19 --out init_resnet50.safetensors",
        ),
    )
    i.add_argument("--weights", required=True, metavar="FILE", help="the weight file (.pth or .safetensors)")
    i.add_argument("--arch", required=True, choices=IMAGENET_ARCHS, help=_ARCH_HELP + "; timm: any timm backbone")
    i.add_argument(
        "--timm-name", metavar="NAME", help="with --arch timm: the timm model the file holds (e.g. resnet50)"
    )
    i.add_argument(
        "--output-stride",
        type=int,
        metavar="N",
        help="with --arch timm: output stride of the encoder (default: 8 where the family can dilate)",
    )
    i.add_argument(
        "--variant", choices=("paper", "reference"), default="paper", help="network variant (default: paper)"
    )
    i.add_argument("--num-classes", type=int, default=19, help="number of classes (default: 19)")
    i.add_argument(
        "--norm",
        choices=[n for n in NORMS if n != "unit"],
        default=None,
        help="input normalisation stored in the checkpoint (default: caffe for the DeepLab file, "
        "imagenet for torchvision weights)",
    )
    i.add_argument("--format", dest="fmt", choices=FORMATS, default="auto", help="file layout (default: detect)")
    _common_flags(i)

    lab = sub.add_parser(
        "labels",
        help="colour label images -> single-channel class-index labels",
        description="Convert colour label PNGs (each class painted in its colour from classes.yaml) into "
        "single-channel class-index PNGs with the same file names, as folder datasets need. A colour that is "
        "in no class stops the conversion (every unknown colour is listed, with its pixel count); nothing is "
        "written unless every file converts.",
        epilog=examples(
            "dast convert labels --classes my_renders/classes.yaml --in my_renders/labels_colour "
            "--out my_renders/labels --ignore-color 0,0,0"
        ),
    )
    lab.add_argument(
        "--classes", required=True, metavar="classes.yaml", help="class list: {name, color} entries in index order"
    )
    lab.add_argument("--in", dest="in_dir", required=True, metavar="RGB_LABEL_DIR", help="folder of colour label PNGs")
    lab.add_argument("--out", required=True, metavar="INDEX_LABEL_DIR", help="folder to write the index PNGs into")
    lab.add_argument(
        "--ignore-color",
        dest="ignore_colors",
        action="append",
        type=_rgb_arg,
        default=[],
        metavar="R,G,B",
        help="a colour whose pixels become 255 (ignored); repeatable",
    )
    lab.add_argument("--force", action="store_true", help="replace a non-empty --out folder (its contents are deleted)")
    lab.add_argument("--workers", type=positive_int, default=None, help="converter threads (default: up to 8)")
    add_progress_argument(lab)
    lab.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return p


def _rgb_arg(text: str) -> tuple[int, int, int]:
    try:
        return parse_rgb(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="CKPT", help="dast checkpoint to write (.safetensors)")
    p.add_argument("--allow-unexpected", action="store_true", help="ignore keys of the file that fit nothing")
    p.add_argument(
        "--allow-missing", action="store_true", help="keep tensors the file lacks at their fresh initialisation"
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    p.add_argument("--max-keys", type=int, default=8, help="list at most this many keys per category (default: 8)")


def run(args: argparse.Namespace, known: Sequence[KnownWeights] = KNOWN_WEIGHTS) -> int:
    """Run ``dast convert``; ``known`` is the table of recognised weight files."""
    if args.source == "labels":
        return _labels(args)
    if args.num_classes < 2:
        raise UserError(f"--num-classes must be at least 2, got {args.num_classes}")
    if args.source == "official":
        nets, report, meta, inputs = _official(args, known)
    else:
        nets, report, meta, inputs = _imagenet(args, known)
    meta["inputs"] = [p.to_dict() for p in inputs]
    out = Path(args.out)
    save_networks(out, nets, {"converted": meta, "dast_version": __version__})
    print(report.summary(args.max_keys))
    spec = nets.spec
    parts = [p for p, on in (("discoverer", spec.discoverer), ("corrector", spec.corrector)) if on]
    print(
        f"wrote {out}: {spec.arch}, {spec.num_classes} classes, variant {spec.variant}, norm {spec.norm}"
        + (f", with {' and '.join(parts)}" if parts else ", segmentor only")
    )
    if args.source == "official" and not spec.discoverer:
        print("note: without --discriminators the model has no attention, unlike the network the authors evaluated")
    for p in inputs:
        if args.source == "imagenet" and p.known is not None and p.known.norm not in (None, spec.norm):
            print(
                f"note: {p.known.file_name} expects norm {p.known.norm}, but the checkpoint stores norm {spec.norm}; "
                f"pass --norm {p.known.norm} unless you mean it"
            )
    sys.stdout.flush()
    return 0


def _provenance(paths: Sequence[Path], known: Sequence[KnownWeights]) -> list[FileProvenance]:
    """Hash and identify the input files, printing what was found."""
    found = [inspect_file(p, known) for p in paths]
    for p in found:
        print("\n".join(p.lines()))
    sys.stdout.flush()
    return found


def _official(
    args: argparse.Namespace, known: Sequence[KnownWeights]
) -> tuple[Networks, ConversionReport, dict[str, object], list[FileProvenance]]:
    seg_path = existing_file(args.segmentor, "segmentor checkpoint")
    d_path = existing_file(args.discriminators, "discriminators checkpoint") if args.discriminators else None
    inputs = _provenance([seg_path] + ([d_path] if d_path else []), known)
    seg_sd = load_torch_file(seg_path)
    d_sd = load_torch_file(d_path) if d_path else None
    source = str(seg_path) if d_path is None else f"{seg_path} + {d_path}"
    nets, report = official_to_dast(
        seg_sd,
        d_sd,
        args.arch,
        args.num_classes,
        variant=args.variant,
        allow_unexpected=args.allow_unexpected,
        allow_missing=args.allow_missing,
        source=source,
    )
    meta: dict[str, object] = {
        "from": "official",
        "segmentor": seg_path.name,
        "discriminators": d_path.name if d_path else None,
        "report": report.to_dict(),
    }
    return nets, report, meta, inputs


def _imagenet(
    args: argparse.Namespace, known: Sequence[KnownWeights]
) -> tuple[Networks, ConversionReport, dict[str, object], list[FileProvenance]]:
    if (args.arch == "timm") != (args.timm_name is not None):
        raise UserError("--timm-name goes with --arch timm, and --arch timm needs --timm-name")
    if args.output_stride is not None and args.arch != "timm":
        raise UserError("--output-stride applies to --arch timm only")
    path = existing_file(args.weights, "weight file")
    inputs = _provenance([path], known)
    sd = load_torch_file(path)
    if args.arch == "timm":
        if args.variant != "paper" or args.fmt != "auto":
            raise UserError("--arch timm takes neither --variant reference nor --format")
        nets, report = timm_to_dast(
            sd,
            args.timm_name,
            args.num_classes,
            output_stride=args.output_stride,
            norm=args.norm,
            allow_unexpected=args.allow_unexpected,
            allow_missing=args.allow_missing,
            source=str(path),
        )
        meta: dict[str, object] = {
            "from": "timm",
            "weights": path.name,
            "timm_name": args.timm_name,
            "report": report.to_dict(),
        }
        return nets, report, meta, inputs
    options = ImportOptions(
        fmt=args.fmt,
        norm=args.norm,
        allow_unexpected=args.allow_unexpected,
        allow_missing=args.allow_missing,
        source=str(path),
    )
    nets, report = imagenet_to_dast(sd, args.arch, args.num_classes, args.variant, options)
    meta = {"from": "imagenet", "weights": path.name, "report": report.to_dict()}
    return nets, report, meta, inputs


def _labels(args: argparse.Namespace) -> int:
    classes = existing_file(args.classes, "class list")
    table = read_class_file(classes)
    done = convert_label_folder(
        table,
        args.in_dir,
        args.out,
        ignore=args.ignore_colors,
        force=args.force,
        classes_name=str(classes),
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(_label_summary(done, table.names))
    return 0


def _label_summary(done: LabelConversion, names: tuple[str, ...]) -> str:
    total = int(done.pixels.sum()) + done.ignored
    share = [f"{n} {100.0 * int(c) / max(total, 1):.1f}%" for n, c in zip(names, done.pixels)]
    lines = [
        (
            f"converted {done.files} label file{'s' if done.files != 1 else ''} into {done.out_dir}: "
            f"{len(names)} classes, {100.0 * done.ignored / max(total, 1):.1f}% of the pixels ignored (255)"
        ),
        "pixels per class: " + ", ".join(share),
    ]
    absent = [n for n, c in zip(names, done.pixels) if int(c) == 0]
    if absent:
        lines.append(f"note: no pixel of class{'es' if len(absent) > 1 else ''} {', '.join(absent)}")
    return "\n".join(lines)
