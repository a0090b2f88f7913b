"""Compare dast's networks with the authors' released implementation, number for number.

The released code is imported at run time from a checked-out copy of the authors'
repository (``--released-repo DIR``); nothing of it is copied into dast. The script

1. builds the released ``DeeplabMulti`` (or ``DeeplabVGG``) and the ``ModuleList`` of
   ``FCDiscriminator`` and ``OutspaceDiscriminator`` with a fixed seed, gives their
   BatchNorm layers realistic running statistics (a few train-mode passes over random
   images) and non-trivial affine parameters, and saves both state dicts as ``.pth``;
2. converts them with ``dast convert official``;
3. feeds the same caffe-normalised input (a seeded random image) to the released
   ``model(x, D, 'target')`` and to dast's ``TargetModel``, in eval mode and in train
   mode, and compares the logits, the argmax and the updated BatchNorm statistics;
4. with ``--image PNG``, also compares the released data set's preprocessing with
   dast's, and the released logits with ``dast predict --save-logits``.

It prints one JSON object and exits 0 when every comparison is within ``--tol``
(absolute) with identical argmax, 1 otherwise.

    # /tmp/dast_ref: a checked-out copy of yufei1900/DAST_segmentation
    python benchmarks/compare_reference.py --released-repo /tmp/dast_ref --size 256 128
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dast.cli import main as dast_main
from dast.data.transforms import CAFFE_MEAN_BGR, normalize, resize_image
from dast.models.convert import dast_to_official
from dast.models.io import load_networks

NUM_CLASSES = 19


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--released-repo", required=True, type=Path, help="a checked-out copy of the released DAST code")
    p.add_argument("--arch", choices=("resnet101", "vgg16"), default="resnet101")
    p.add_argument(
        "--size", type=int, nargs=2, default=(1024, 512), metavar=("W", "H"), help="input size (default 1024 512)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--image", type=Path, help="also compare preprocessing and `dast predict` on this image")
    p.add_argument("--tol", type=float, default=1e-4, help="absolute tolerance on logits (default 1e-4)")
    p.add_argument("--keep", type=Path, help="keep the .pth files and the converted checkpoint in this folder")
    return p.parse_args()


# ---------------------------------------------------------------------------
# the released code, imported at run time


def _import_released(repo: Path, arch: str) -> tuple[Any, Any, list[str]]:
    """Import the released model modules from ``repo``; return (models module, discriminator module, shims)."""
    if not (repo / "model" / "deeplab_multi.py").is_file():
        raise SystemExit(f"error: {repo} does not look like the released DAST code (no model/deeplab_multi.py)")
    shims: list[str] = []
    sys.dont_write_bytecode = True  # leave the released checkout as it is
    sys.path.insert(0, str(repo.resolve()))
    try:
        import torchvision  # noqa: F401, PLC0415 - optional: the released data set and VGG model import it
    except Exception as exc:  # noqa: BLE001 - absent, or a build that does not match this torch
        sys.modules["torchvision"] = _torchvision_standin()
        shims.append(
            f"torchvision ({type(exc).__name__}): stand-in module with models.vgg16 (the standard"
            " VGG-16 'D' features, classifier left empty); the released data set imports it unused"
        )
    name = "model.deeplab_vgg" if arch == "vgg16" else "model.deeplab_multi"
    models = importlib.import_module(name)
    disc = importlib.import_module("model.discriminator")
    return models, disc, shims


def _torchvision_standin() -> types.ModuleType:
    """A minimal ``torchvision`` whose ``models.vgg16()`` has torchvision's ``features``.

    Used only where torchvision cannot be imported. The released VGG model takes
    ``features`` from it and ignores ``classifier``, which is left empty here.
    """
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    class _VGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            cin = 3
            for v in cfg:
                if v == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    conv = nn.Conv2d(cin, int(v), kernel_size=3, padding=1)
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(conv.bias)
                    layers += [conv, nn.ReLU(inplace=True)]
                    cin = int(v)
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential()

    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.vgg16 = lambda **_: _VGG()  # type: ignore[attr-defined]
    tv.models = models  # type: ignore[attr-defined]
    sys.modules["torchvision.models"] = models
    return tv


def _build_released(
    models: Any, disc: Any, arch: str, seed: int, size: tuple[int, int], device: torch.device
) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(seed)
    if arch == "vgg16":
        model = models.DeeplabVGG(num_classes=NUM_CLASSES)
        channels = 512
    else:
        model = models.DeeplabMulti(num_classes=NUM_CLASSES)
        channels = 2048
    model_d = nn.ModuleList(
        [disc.FCDiscriminator(num_classes=channels), disc.OutspaceDiscriminator(num_classes=NUM_CLASSES)]
    )
    model.to(device)
    model_d.to(device)
    _calibrate_batchnorm(model, model_d, size, seed, device)
    return model, model_d


def _calibrate_batchnorm(
    model: nn.Module, model_d: nn.ModuleList, size: tuple[int, int], seed: int, device: torch.device
) -> None:
    """Give the BN layers realistic running statistics and non-trivial affine parameters.

    The released initialisation (mean 0, var 1, weight 1, bias 0) would make eval-mode
    activations vanish and the comparison trivial.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            m.momentum = None  # cumulative average over the calibration passes
        model.train()
        for _ in range(2):
            rgb = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            model(normalize(rgb, "caffe")[None].to(device), model_d, "target")
        for m in bns:
            m.momentum = 0.1


def _save_pth(sd: dict[str, torch.Tensor], path: Path) -> None:
    torch.save({k: v.detach().cpu() for k, v in sd.items()}, str(path))


# ---------------------------------------------------------------------------
# comparisons


def _compare(ref: torch.Tensor, ours: torch.Tensor, logits: bool = True) -> dict[str, Any]:
    ref, ours = ref.detach().float().cpu(), ours.detach().float().cpu()
    if ref.shape != ours.shape:
        return {
            "shape_ref": list(ref.shape),
            "shape_ours": list(ours.shape),
            "max_abs_diff": float("inf"),
            "argmax_agreement": 0.0,
        }
    diff = (ref - ours).abs()
    out = {
        "shape": list(ref.shape),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / ref.abs().clamp_min(1e-6)).max()),
        "ref_abs_max": float(ref.abs().max()),
        "ref_std": float(ref.std()),
    }
    if logits:
        out["argmax_agreement"] = float((ref.argmax(1) == ours.argmax(1)).float().mean())
    return out


def _upsampled_agreement(ref: torch.Tensor, ours: torch.Tensor, size: tuple[int, int]) -> float:
    up = lambda t: F.interpolate(t.float().cpu(), size=(size[1], size[0]), mode="bilinear", align_corners=True)  # noqa: E731
    return float((up(ref).argmax(1) == up(ours).argmax(1)).float().mean())


def _ok(d: dict[str, Any], tol: float) -> bool:
    return d["max_abs_diff"] <= tol and d.get("argmax_agreement", 1.0) == 1.0


def _quiet_cli(argv: list[str]) -> tuple[int, str]:
    """Run a dast command in-process, its stdout captured (this script's stdout is JSON)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = dast_main(argv)
    return code, buf.getvalue()


def _released_preprocess(image: Path, size: tuple[int, int], work: Path) -> np.ndarray:
    """The released Cityscapes data set's preprocessing of ``image`` (C x H x W, float32)."""
    ds_mod = importlib.import_module("dataset.cityscapes_dataset")
    root = work / "cityscapes"
    (root / "leftImg8bit" / "val").mkdir(parents=True, exist_ok=True)
    shutil.copy(image, root / "leftImg8bit" / "val" / image.name)
    lst = work / "list.txt"
    lst.write_text(image.name + "\n")
    ds = ds_mod.cityscapesDataSet(
        str(root),
        str(lst),
        crop_size=tuple(size),
        mean=CAFFE_MEAN_BGR.astype(np.float32),
        scale=False,
        mirror=False,
        set="val",
    )
    arr, _, _ = ds[0]
    return np.asarray(arr, np.float32)


def _compare_image(
    args: argparse.Namespace, model: nn.Module, model_d: nn.ModuleList, ckpt: Path, work: Path, device: torch.device
) -> dict[str, Any]:
    size = tuple(args.size)
    ref_arr = _released_preprocess(args.image, size, work)
    rgb = np.asarray(Image.open(args.image).convert("RGB"))
    ours_arr = normalize(resize_image(rgb, size), "caffe").numpy()
    result: dict[str, Any] = {
        "image": str(args.image),
        "original_size": [int(rgb.shape[1]), int(rgb.shape[0])],
        "preprocess_max_abs_diff": float(np.abs(ref_arr - ours_arr).max()),
    }
    model.eval()
    model_d.eval()
    with torch.no_grad():
        _, ref_logits = model(torch.from_numpy(ref_arr)[None].to(device), model_d, "target")
    pred_dir = work / "predict"
    code, _ = _quiet_cli(
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--input",
            str(args.image),
            "--out",
            str(pred_dir),
            "--save-logits",
            "--size",
            str(size[0]),
            str(size[1]),
            "--device",
            device.type,
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    if code != 0:
        result["predict"] = f"dast predict failed with exit code {code}"
        return result
    npys = sorted(pred_dir.glob("*.npy"))  # predict may shorten the stem (Cityscapes' _leftImg8bit)
    if len(npys) != 1:
        result["predict"] = f"expected one .npy from dast predict, found {len(npys)}"
        return result
    stem = npys[0].stem
    ours_logits = torch.from_numpy(np.load(pred_dir / f"{stem}.npy"))[None]
    result["predict_logits"] = _compare(ref_logits, ours_logits)
    # the label PNG: released logits upsampled (align_corners=True) to the original size, argmax
    w0, h0 = result["original_size"]
    ref_up = F.interpolate(ref_logits.float().cpu(), size=(h0, w0), mode="bilinear", align_corners=True).argmax(1)[0]
    png = np.asarray(Image.open(pred_dir / f"{stem}.png"))
    result["predict_png_agreement"] = float((torch.from_numpy(png.astype(np.int64)) == ref_up).float().mean())
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    size = (int(args.size[0]), int(args.size[1]))
    models, disc, shims = _import_released(args.released_repo, args.arch)
    model, model_d = _build_released(models, disc, args.arch, args.seed, size, device)

    work = Path(tempfile.mkdtemp(prefix="dast_compare_"))
    try:
        seg_pth, d_pth, ckpt = work / "released.pth", work / "released_D.pth", work / "converted.safetensors"
        _save_pth(model.state_dict(), seg_pth)
        _save_pth(model_d.state_dict(), d_pth)
        code, convert_out = _quiet_cli(
            [
                "convert",
                "official",
                "--segmentor",
                str(seg_pth),
                "--discriminators",
                str(d_pth),
                "--arch",
                args.arch,
                "--num-classes",
                str(NUM_CLASSES),
                "--out",
                str(ckpt),
            ]
        )
        if code != 0:
            raise SystemExit(f"error: dast convert official failed with exit code {code}")
        nets, _, meta = load_networks(ckpt, device)
        tm = nets.target_model()

        g = torch.Generator().manual_seed(args.seed + 2)
        rgb = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        # the released preprocessing, spelt out: float32, RGB -> BGR, minus the caffe mean
        x_ref = torch.from_numpy((rgb.astype(np.float32)[:, :, ::-1] - CAFFE_MEAN_BGR).transpose(2, 0, 1).copy())
        x_ours = normalize(rgb, "caffe")
        x = x_ref[None].to(device)

        result: dict[str, Any] = {
            "arch": args.arch,
            "size": list(size),
            "seed": args.seed,
            "device": str(device),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "shims": shims,
            "convert_report": meta["converted"]["report"]["counts"],
            "synthetic_preprocess_max_abs_diff": float((x_ref - x_ours).abs().max()),
        }
        # eval mode
        model.eval()
        model_d.eval()
        tm.eval()
        with torch.no_grad():
            f_ref, ref_t = model(x, model_d, "target")
            _, ref_s = model(x, model_d, "source")
            ours_t, _ = tm(x)
            f_ours = nets.segmentor.extract(x)
            ours_s = nets.segmentor(x)
        ev = _compare(ref_t, ours_t)
        ev["upsampled_argmax_agreement"] = _upsampled_agreement(ref_t, ours_t, size)
        result["eval"] = {
            "target_logits": ev,
            "source_logits": _compare(ref_s, ours_s),
            "features": _compare(f_ref, f_ours, logits=False),
        }
        if args.image is not None:  # before the train-mode pass changes the running statistics
            result["image"] = _compare_image(args, model, model_d, ckpt, work, device)
        # train mode: batch statistics, running statistics updated by the pass
        model.train()
        model_d.train()
        tm.train()
        with torch.no_grad():
            _, ref_tt = model(x, model_d, "target")
            ours_tt, _ = tm(x)
        tr = _compare(ref_tt, ours_tt)
        ours_seg, _ = dast_to_official(nets)
        ref_sd = model.state_dict()
        stats = [k for k in ref_sd if k.endswith(("running_mean", "running_var"))]
        tr["running_stats_max_abs_diff"] = max(
            (float((ref_sd[k].float().cpu() - ours_seg[k].float().cpu()).abs().max()) for k in stats), default=0.0
        )
        result["train"] = {"target_logits": tr}

        checks = [result["eval"]["target_logits"], result["eval"]["source_logits"], result["train"]["target_logits"]]
        if "image" in result and isinstance(result["image"].get("predict_logits"), dict):
            checks.append(result["image"]["predict_logits"])
        ok = all(_ok(c, args.tol) for c in checks)
        ok = ok and result["train"]["target_logits"]["running_stats_max_abs_diff"] <= args.tol
        if "image" in result:
            ok = ok and result["image"]["preprocess_max_abs_diff"] == 0.0 and "predict" not in result["image"]
            ok = ok and result["image"].get("predict_png_agreement") == 1.0
        result["tolerance"] = args.tol
        result["pass"] = bool(ok)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for p in (seg_pth, d_pth, ckpt):
                shutil.copy(p, args.keep / p.name)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    args = _parse()
    result = run(args)
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
