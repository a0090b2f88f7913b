"""timm backbones as the segmentor's encoder: shapes, output strides, parameter groups,
local weight files (against timm's own loader and torchvision), checkpoints, ONNX,
`dast predict`, and `dast train` + `dast report` end to end.

Random weights and timm's tiny ``test_*`` models only: nothing is downloaded. The file
is skipped where timm is not installed (see tests/test_timm_config.py for the hint).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dast.cli import main
from dast.errors import ConfigError, UserError
from dast.models.batchnorm import PerImageBatchNorm2d, use_per_image_batchnorm
from dast.models.io import ModelSpec, build_networks, load_networks, save_networks
from dast.models.timm_backbone import aspp_rates, build_timm_segmentor, create_timm_encoder
from dast.training.optim import segmentor_param_groups

timm = pytest.importorskip("timm", reason="timm is optional: pip install 'dast[timm]'")


def _x(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("name", "stride", "want_stride", "channels"),
    [
        ("resnet10t", None, 8, 512),
        ("resnet10t", 16, 16, 512),
        ("resnet10t", 32, 32, 512),
        ("test_convnext", None, 8, 64),
        ("test_efficientnet", None, 8, 64),
        ("test_vit", None, 16, 64),  # no dilation: the patch size
        ("test_mambaout", None, 32, 64),  # no dilation, NHWC features
    ],
)
def test_forward_shapes(name: str, stride: int | None, want_stride: int, channels: int) -> None:
    torch.manual_seed(0)
    nets = build_networks(ModelSpec(arch="timm", num_classes=5, norm="imagenet", timm_name=name, output_stride=stride))
    enc = nets.segmentor.encoder
    assert (enc.output_stride, enc.out_channels) == (want_stride, channels)
    assert nets.discoverer is not None and nets.discoverer.in_channels == channels
    assert nets.discoverer.conv1.out_channels == channels // 2
    assert isinstance(nets.segmentor.tail, torch.nn.Identity)
    h, w = 64, 96
    model = nets.target_model().eval()
    with torch.no_grad():
        f = nets.segmentor.extract(_x(2, h, w))
        logits, alpha = model(_x(2, h, w))
    assert tuple(f.shape) == (2, channels, h // want_stride, w // want_stride)
    assert tuple(logits.shape) == (2, 5, h // want_stride, w // want_stride)
    assert tuple(alpha.shape) == (2, 1, h // want_stride, w // want_stride)
    assert float(alpha.min()) >= 0.0 and float(alpha.max()) < 1.0


def test_aspp_rates_follow_the_stride() -> None:
    assert aspp_rates(8) == (6, 12, 18, 24)  # the paper's
    assert aspp_rates(16) == (3, 6, 9, 12)
    assert aspp_rates(32) == (1, 3, 4, 6)
    seg = build_timm_segmentor("test_resnet", 3, output_stride=16)
    assert [c.dilation for c in seg.classifier.conv2d_list] == [(3, 3), (6, 6), (9, 9), (12, 12)]


def test_bad_names_and_strides_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"'resnet_10t' is not a timm model \(did you mean 'resnet10t'\?\)"):
        create_timm_encoder("resnet_10t")
    with pytest.raises(ConfigError, match=r"'resnet10t.bogus': RuntimeError: Invalid pretrained tag \(bogus\)"):
        create_timm_encoder("resnet10t.bogus")
    with pytest.raises(ConfigError, match=r"'test_vit' cannot run at output stride 8; it runs at 16 \("):
        create_timm_encoder("test_vit", output_stride=8)
    assert create_timm_encoder("test_vit", output_stride=16).output_stride == 16
    with pytest.raises(ConfigError, match=r"'resnet10t' cannot run at output stride 4; it runs at 8, 16, 32 \("):
        create_timm_encoder("resnet10t", output_stride=4)


def test_parameter_groups_cover_the_segmentor() -> None:
    seg = build_timm_segmentor("test_resnet", 4)
    backbone = {id(p) for p in seg.backbone_parameters()}
    head = {id(p) for p in seg.head_parameters()}
    everything = {id(p) for p in seg.parameters() if p.requires_grad}
    assert backbone and head and not backbone & head and backbone | head == everything
    assert head == {id(p) for p in seg.classifier.parameters()}
    assert {id(p) for m in seg.stages() for p in m.parameters()} == {id(p) for p in seg.encoder.parameters()}
    groups = segmentor_param_groups(seg, lr=0.01, head_lr_mult=10.0, duplicate_params=False)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    assert {id(p) for p in groups[1]["params"]} == head


def test_pretrained_without_weights_or_network_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    if timm.list_models("mobilenetv2_035", pretrained=True):
        pytest.skip("this timm has pretrained weights for mobilenetv2_035")
    with pytest.raises(ConfigError, match=r"timm has no pretrained weights for 'mobilenetv2_035'"):
        create_timm_encoder("mobilenetv2_035", pretrained=True)
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as without network: nothing is fetched
    with pytest.raises(UserError, match=r"could not fetch timm's weights for 'test_resnet' .*needs network access"):
        create_timm_encoder("test_resnet", pretrained=True)


def test_per_image_batchnorm_converts_plain_batchnorm_and_refuses_fused_ones() -> None:
    torch.manual_seed(0)
    seg = build_timm_segmentor("resnet10t", 3)
    n_bn = sum(type(m) is torch.nn.BatchNorm2d for m in seg.modules())
    use_per_image_batchnorm(seg)
    assert n_bn > 0 and sum(isinstance(m, PerImageBatchNorm2d) for m in seg.modules()) == n_bn
    x = _x(2, 64, 96)
    with torch.no_grad():  # batch of two == each image alone (train mode: per-image statistics)
        both = seg.train()(x)
        alone = torch.cat([seg(x[:1]), seg(x[1:])])
    torch.testing.assert_close(both, alone, rtol=0, atol=1e-5)
    fused = build_timm_segmentor("test_efficientnet", 3)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(ConfigError, match=r"per_image replaces plain BatchNorm2d layers only.*BatchNormAct2d"):
        use_per_image_batchnorm(fused)
    assert not any(isinstance(m, PerImageBatchNorm2d) for m in fused.modules())
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())


# ---------------------------------------------------------------------------- weights


def _convert(weights: Path, name: str, out: Path, *extra: str) -> int:
    return main(
        [
            "convert",
            "imagenet",
            "--arch",
            "timm",
            "--timm-name",
            name,
            "--weights",
            str(weights),
            "--num-classes",
            "4",
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"])
def test_convert_equals_timms_own_loader(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A whole-model timm file converted by dast gives the encoder that timm itself loads from it."""
    torch.manual_seed(1)
    full = timm.create_model(name)
    sd = {k: v.clone() for k, v in full.state_dict().items()}
    for k, v in sd.items():  # non-trivial BatchNorm statistics
        if k.endswith(("running_mean", "running_var")):
            v.uniform_(0.5, 1.5)
    weights = tmp_path / f"{name}.safetensors"
    save_file(sd, str(weights))
    out = tmp_path / "ckpt.safetensors"
    assert _convert(weights, name, out) == 0
    printed = capsys.readouterr().out
    assert "0 missing, 0 unexpected" in printed and "variant paper, norm imagenet" in printed
    nets, _, meta = load_networks(out)
    enc = nets.segmentor.encoder
    assert meta["converted"]["from"] == "timm" and nets.spec.timm_name == name
    theirs = timm.create_model(
        name,
        features_only=True,
        out_indices=(-1,),
        pretrained=True,
        pretrained_cfg_overlay={"file": str(weights)},
        **enc.timm_kwargs,
    )
    ours = enc.body.state_dict()
    assert ours.keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours[k], v), k
    skipped = set(meta["converted"]["report"]["skipped"])
    assert skipped and skipped == {
        k for k in sd if k not in ours and "model." + k not in ours and k.replace(".", "_", 1) not in ours
    }
    enc.eval()
    theirs.eval()
    with torch.no_grad():
        x = _x(1, 64, 96)
        assert torch.equal(enc(x), theirs(x)[-1])


def test_convert_torchvision_resnet(tmp_path: Path) -> None:
    """torchvision's ResNet keys are timm's: the converted encoder computes torchvision's layer4."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(2)
    net = tv.models.resnet18().eval()
    weights = tmp_path / "resnet18-tv.pth"
    torch.save(net.state_dict(), weights)
    out = tmp_path / "ckpt.safetensors"
    assert _convert(weights, "resnet18", out, "--output-stride", "32") == 0
    nets, _, _ = load_networks(out)
    assert nets.spec.output_stride == 32
    x = _x(2, 64, 96)
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        want = net.layer4(net.layer3(net.layer2(net.layer1(y))))
        got = nets.segmentor.encoder.eval()(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_convert_rejects_a_file_of_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = timm.create_model("test_resnet").state_dict()
    renamed = tmp_path / "renamed.pth"
    torch.save({("old_" + k if k.startswith("layer4.") else k): v for k, v in sd.items()}, renamed)
    out = tmp_path / "ckpt.safetensors"
    assert _convert(renamed, "test_resnet", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "fit no part of timm model 'test_resnet'" in err[0] and "'old_layer4." in err[0]
    assert "of its encoder are not in the file" in err[0] and "'layer4." in err[0]
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), other)
    assert _convert(other, "test_resnet", out) == 2
    assert "does the file hold timm model 'test_resnet'?" in capsys.readouterr().err
    ckpt = _trained_like_checkpoint(tmp_path)
    assert _convert(ckpt, "resnet10t", out) == 2
    assert "already a dast checkpoint" in capsys.readouterr().err
    assert not out.exists()
    assert (
        main(["convert", "imagenet", "--arch", "small", "--timm-name", "x", "--weights", str(other), "--out", str(out)])
        == 2
    )
    assert "--timm-name goes with --arch timm" in capsys.readouterr().err


# ---------------------------------------------------------------------------- checkpoints, export, predict


def _trained_like_checkpoint(tmp_path: Path) -> Path:
    """A resnet10t model at output stride 16 whose BatchNorm statistics are not the initial ones."""
    torch.manual_seed(3)
    spec = ModelSpec(
        arch="timm",
        num_classes=4,
        norm="imagenet",
        timm_name="resnet10t",
        output_stride=16,
        input_size=(96, 64),
        class_names=["a", "b", "c", "d"],
        class_colors=[(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)],
    )
    nets = build_networks(spec)
    with torch.no_grad():
        nets.segmentor.train()(_x(2, 64, 96, seed=9) * 2 + 0.5)
    path = tmp_path / "model.safetensors"
    save_networks(path, nets)
    return path


def test_checkpoint_roundtrip_gives_identical_logits(tmp_path: Path) -> None:
    path = _trained_like_checkpoint(tmp_path)
    stored = load_file(str(path))
    assert any(k.startswith("segmentor.encoder.body.layer4.") for k in stored)
    a, _, meta = load_networks(path)
    b, _, _ = load_networks(path)
    assert meta["model"]["timm_name"] == "resnet10t" and meta["model"]["output_stride"] == 16
    assert a.segmentor.encoder.output_stride == 16
    x = _x(2, 64, 96, seed=4)
    with torch.no_grad():
        la, aa = a.target_model().eval()(x)
        lb, ab = b.target_model().eval()(x)
    assert torch.equal(la, lb) and torch.equal(aa, ab)
    fresh = build_networks(a.spec)  # the stored weights, not a re-initialisation, make them equal
    with torch.no_grad():
        assert not torch.equal(fresh.target_model().eval()(x)[0], la)


def test_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = _trained_like_checkpoint(tmp_path)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out)]) == 0
    nets, _, _ = load_networks(path)
    model = nets.target_model().eval()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 96), (2, 3, 80, 112)]:
        x = _x(*shape[:1], *shape[2:], seed=shape[2])
        with torch.no_grad():
            ref = [t.numpy() for t in model(x)]
        got = sess.run(["logits", "attention"], {"image": x.numpy()})
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-4)
        agree = float((ref[0].argmax(1) == got[0].argmax(1)).mean())
        assert agree >= 0.999


def test_predict_with_a_timm_checkpoint(tmp_path: Path) -> None:
    path = _trained_like_checkpoint(tmp_path)
    img = tmp_path / "in" / "street.png"
    img.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(path),
                "--input",
                str(img),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--workers",
                "0",
                "--no-progress",
                "--save-logits",
            ]
        )
        == 0
    )
    label = np.array(Image.open(out / "street.png"))
    assert label.shape == (50, 70) and label.max() < 4
    assert (out / "street_color.png").is_file() and (out / "street_attention.png").is_file()
    logits = np.load(out / "street.npy")
    assert logits.shape == (4, 64 // 16, 96 // 16)  # resized to the stored 96x64, output stride 16


# ---------------------------------------------------------------------------- training


@pytest.mark.slow
def test_train_and_report_with_a_timm_backbone(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        model={"arch": "timm", "timm_name": "resnet10t", "norm": "imagenet"},
        train={"steps": 4, "checkpoint_every": 2, "keep_last": 2},
        self_training={"rounds": 1, "steps": 1},
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    nets, _, meta = load_networks(run / "final" / "model.safetensors")
    assert (meta["model"]["arch"], meta["model"]["timm_name"], meta["model"]["output_stride"]) == (
        "timm",
        "resnet10t",
        None,
    )
    assert nets.segmentor.encoder.output_stride == 8
    ckpts = run / "stage1" / "checkpoints"
    a, b = load_file(str(ckpts / "step_00000002.safetensors")), load_file(str(ckpts / "step_00000004.safetensors"))
    for prefix in (
        "segmentor.encoder.body.conv1.0.weight",
        "segmentor.classifier.conv2d_list.0.weight",
        "discoverer.conv1.weight",
    ):
        assert not torch.equal(a[prefix], b[prefix]), prefix  # E, P and D all train
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 100.0
    assert main(["report", str(run), "--samples", "1", "--device", "cpu"]) == 0
    assert "resnet10t" in (run / "report.html").read_text(encoding="utf-8")
