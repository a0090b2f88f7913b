"""`model.arch: timm` config rules and the missing-timm hint (these need no timm)."""

from __future__ import annotations

import builtins
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dast.checkpoint import save_checkpoint
from dast.cli import main
from dast.config import config_diff, load_config
from dast.errors import ConfigError
from dast.models.io import ModelSpec, build_networks
from dast.models.timm_backbone import install_hint

REPO = Path(__file__).resolve().parents[1]
HINT = install_hint(torch.__version__)  # the torchvision of this torch, then timm; never `pip install dast`
TIMM = ["--set", "model.arch=timm", "--set", "model.timm_name=resnet10t", "--set", "model.norm=imagenet"]


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if a != "--set"]


def test_timm_keys_must_fit_together(tiny_config) -> None:
    cfg = tiny_config()
    ok = load_config(cfg, _overrides(TIMM))
    assert (ok.model.arch, ok.model.timm_name, ok.model.output_stride, ok.model.pretrained) == (
        "timm",
        "resnet10t",
        None,
        False,
    )
    with pytest.raises(ConfigError, match=r"'model.timm_name' is required with model.arch: timm"):
        load_config(cfg, ["model.arch=timm", "model.norm=imagenet"])
    with pytest.raises(ConfigError, match=r"model.arch: timm needs variant: paper"):
        load_config(cfg, [*_overrides(TIMM), "variant=reference"])
    with pytest.raises(ConfigError, match=r"'model.timm_name' applies to model.arch: timm only"):
        load_config(cfg, ["model.timm_name=resnet10t"])
    with pytest.raises(ConfigError, match=r"'model.pretrained' applies to model.arch: timm only"):
        load_config(cfg, ["model.pretrained=true"])
    with pytest.raises(
        ConfigError, match=r"'model.output_stride': output stride 16 is not supported by the small architecture"
    ):
        load_config(cfg, ["model.output_stride=16"])


def test_caffe_norm_with_timm_warns(tiny_config, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config()
    with caplog.at_level(logging.WARNING, logger="dast.config"):
        load_config(cfg, ["model.arch=timm", "model.timm_name=resnet10t", "model.norm=caffe"])
    assert "timm backbones expect model.norm: imagenet" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dast.config"):
        load_config(cfg, _overrides(TIMM))
        load_config(cfg, ["model.arch=timm", "model.timm_name=resnet10t", "model.norm=unit"])  # random init: fine
    assert caplog.text == ""


def test_missing_timm_gives_the_install_hint(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError, installed or not
    with pytest.raises(ConfigError, match=re.escape(f"needs the timm package: {HINT}")):
        build_networks(ModelSpec(arch="timm", num_classes=3, timm_name="resnet10t"))
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(tiny_config(selection={"enabled": False}, val=None)),
            "--out",
            str(run),
            "--no-progress",
            *TIMM,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"error: a timm backbone (model.arch: timm) needs the timm package: {HINT}"
    assert not run.exists()  # nothing half-made


def test_demo_timm_is_the_demo_with_a_timm_encoder() -> None:
    demo, timm_demo = load_config(REPO / "dast/configs/demo.yaml"), load_config(REPO / "dast/configs/demo_timm.yaml")
    # the demo's small ResNet runs at output stride 4; timm's ResNets dilate down to 8 at most
    assert set(config_diff(demo, timm_demo)) == {"model.arch", "model.timm_name", "model.norm", "model.output_stride"}
    assert (timm_demo.model.timm_name, timm_demo.model.norm, timm_demo.model.pretrained) == (
        "resnet10t",
        "imagenet",
        False,
    )


def test_a_timm_checkpoint_without_timm_gives_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    spec = ModelSpec(arch="timm", num_classes=3, norm="imagenet", timm_name="resnet10t", input_size=(64, 32))
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(
        ckpt, {"segmentor.classifier.conv2d_list.0.bias": torch.zeros(3)}, {"kind": "model", "model": spec.to_dict()}
    )
    image = tmp_path / "street.png"
    Image.new("RGB", (64, 32)).save(image)
    out = tmp_path / "pred"
    assert (
        main(["predict", "--checkpoint", str(ckpt), "--input", str(image), "--out", str(out), "--device", "cpu"]) == 2
    )
    assert capsys.readouterr().err.strip() == (
        f"error: a timm backbone (model.arch: timm) needs the timm package: {HINT}"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("torch_version", "hint"),
    [
        (
            "2.13.0+cpu",
            "pip install 'torchvision==0.28.*' --index-url https://download.pytorch.org/whl/cpu && pip install timm",
        ),
        (
            "2.11.0+cu130",
            "pip install 'torchvision==0.26.*' --index-url https://download.pytorch.org/whl/cu130 && pip install timm",
        ),
        ("2.14.1", "pip install 'torchvision==0.29.*' && pip install timm"),
        ("2.4.1", "pip install 'torchvision==0.19.*' && pip install timm"),
        ("1.13.1", "install the torchvision built for torch 1.13.1, then pip install timm"),
    ],
)
def test_the_install_hint_names_the_torchvision_of_the_installed_torch(torch_version: str, hint: str) -> None:
    # torch 2.x and torchvision 0.x releases go in step, 15 minor versions apart (2.4 <-> 0.19, 2.13 <-> 0.28);
    # a local build (+cpu, +cuXXX) takes its torchvision from PyTorch's index of that build
    assert install_hint(torch_version) == f"{hint} (docs/backbones.md)"
    assert "dast" not in hint  # the name `dast` on the public index is another project


def test_a_timm_that_fails_to_import_names_the_mismatch_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    # what `import timm` raises when torchvision was built for another torch
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "timm":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError) as info:
        build_networks(ModelSpec(arch="timm", num_classes=3, timm_name="resnet10t"))
    message = str(info.value)
    assert message.startswith(
        "a timm backbone (model.arch: timm) needs timm, which is installed but fails to import "
        "(RuntimeError: operator torchvision::nms does not exist): "
    )
    assert f"does not fit torch {torch.__version__}; {HINT}" in message
