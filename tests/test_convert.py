"""Conversion of released checkpoints and ImageNet initialisations (dast.models.convert)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dast.cli import main
from dast.errors import CheckpointError
from dast.models.convert import ConversionReport, ImportOptions, dast_to_official, imagenet_to_dast, official_to_dast
from dast.models.io import ModelSpec, Networks, build_networks, load_networks

# torchvision vgg16 "features": conv index -> (out, in) channels, written out by hand
TV_VGG16_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
    17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512),
}  # fmt: skip


def _seeded(spec: ModelSpec, seed: int) -> Networks:
    """Networks with every float tensor (BN statistics included) randomised."""
    torch.manual_seed(seed)
    nets = build_networks(spec)
    with torch.no_grad():
        for k, v in nets.state_tensors().items():
            if v.is_floating_point():
                if k.endswith("running_var"):
                    v.uniform_(0.5, 1.5)
                else:
                    v.normal_(0.0, 0.05)
            else:
                v.fill_(7)  # num_batches_tracked
    return nets


def _released_resnet101_segmentor_keys() -> set[str]:
    """The released DeeplabMulti state-dict keys, spelt out from its structure."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight"} | {f"bn1.{s}" for s in bn}
    for layer, blocks in (("layer1", 3), ("layer2", 4), ("layer3", 23), ("layer4", 2), ("layer5", 1)):
        for b in range(blocks):
            for i in (1, 2, 3):
                keys.add(f"{layer}.{b}.conv{i}.weight")
                keys |= {f"{layer}.{b}.bn{i}.{s}" for s in bn}
        keys.add(f"{layer}.0.downsample.0.weight")
        keys |= {f"{layer}.0.downsample.1.{s}" for s in bn}
    keys |= {f"layer6.conv2d_list.{i}.{s}" for i in range(4) for s in ("weight", "bias")}
    return keys


@pytest.fixture(scope="module")
def r101() -> Networks:
    torch.manual_seed(0)
    nets = build_networks(ModelSpec("resnet101", 19, "reference"))
    with torch.no_grad():  # O(1) activations (outputs that are not trivially tiny), distinct BN statistics
        for k, v in nets.state_tensors().items():
            if v.dim() == 4:
                v.normal_(0.0, (1.0 / v[0].numel()) ** 0.5)
            elif k.endswith("running_mean"):
                v.normal_(0.0, 0.1)
            elif k.endswith("running_var"):
                v.uniform_(0.5, 1.5)
            elif k.endswith("num_batches_tracked"):
                v.fill_(3)
    return nets


def test_official_layout_matches_the_release(r101: Networks) -> None:
    seg, disc = dast_to_official(r101)
    assert set(seg) == _released_resnet101_segmentor_keys()
    assert len(seg) == 638
    for k in (
        "layer6.conv2d_list.3.weight",
        "layer5.0.downsample.0.weight",
        "layer5.0.conv3.weight",
        "layer4.1.bn3.running_var",
    ):
        assert k in seg
    assert disc is not None and len(disc) == 8 + 10
    for k in ("0.conv3.bias", "0.classifier.bias", "1.conv4.weight", "1.classifier.weight"):
        assert k in disc
    assert tuple(disc["0.conv1.weight"].shape) == (1024, 2048, 3, 3)
    assert tuple(seg["layer6.conv2d_list.3.weight"].shape) == (19, 2048, 3, 3)


def test_round_trip_resnet101_identical_tensors_and_outputs(r101: Networks) -> None:
    seg, disc = dast_to_official(r101)
    back, report = official_to_dast(seg, disc, "resnet101", 19)
    assert report.counts() == {"loaded": 656, "missing": 0, "unexpected": 0, "skipped": 0, "filled": 0}
    assert back.spec.variant == "reference" and back.spec.norm == "caffe"
    assert back.spec.input_size == (1024, 512) and back.spec.attention
    assert back.spec.class_names[0] == "road" and back.spec.class_colors[18] == (119, 11, 32)
    a, b = r101.state_tensors(), back.state_tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randn(1, 3, 17, 19)
    with torch.no_grad():
        la, aa = r101.target_model().eval()(x)
        lb, ab = back.target_model().eval()(x)
    assert torch.equal(la, lb) and torch.equal(aa, ab)
    assert float(aa.abs().max()) > 0  # the attention path was exercised


def test_deeplab_init_file_mapping(r101: Networks) -> None:
    seg, _ = dast_to_official(r101)
    # the ImageNet init layout: 3 blocks in layer4, no fresh shortcut, an old classifier
    # under layer5, no BN counters, every key under one extra word
    init: dict[str, torch.Tensor] = {}
    for k, v in seg.items():
        if k.startswith(("layer6.", "layer5.0.downsample.")) or k.endswith("num_batches_tracked"):
            continue
        k = k.replace("layer5.0.", "layer4.2.")
        init["Scale." + k] = v.clone()
    old = {
        f"Scale.layer5.conv2d_list.{i}.{s}": torch.ones(21 if s == "bias" else (21, 2048, 3, 3))
        for i in range(4)
        for s in ("weight", "bias")
    }
    init.update(old)
    nets, rep = imagenet_to_dast(init, "resnet101", 19, "reference")
    assert rep.source_format == "deeplab" and nets.spec.norm == "caffe"
    assert sorted(rep.skipped) == sorted(old)
    assert rep.unexpected == []
    assert rep.missing == [
        f"segmentor.tail.0.downsample.{s}"
        for s in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var")
    ]
    assert len(rep.filled) == 105 and "segmentor.tail.0.downsample.1.num_batches_tracked" in rep.filled
    own = nets.segmentor.state_dict()
    assert torch.equal(own["tail.0.conv2.weight"], init["Scale.layer4.2.conv2.weight"])
    assert torch.equal(own["encoder.layer4.1.bn3.running_var"], init["Scale.layer4.1.bn3.running_var"])
    assert torch.equal(own["encoder.conv1.weight"], init["Scale.conv1.weight"])
    assert int(own["encoder.bn1.num_batches_tracked"]) == 0
    # the fresh shortcut keeps the released initialisation: BN weight 1, bias 0, conv N(0, 0.01)
    assert torch.equal(own["tail.0.downsample.1.weight"], torch.ones(2048))
    assert abs(float(own["tail.0.downsample.0.weight"].std()) - 0.01) < 1e-3
    assert nets.discoverer is not None and nets.corrector is not None


def _small_official(num_classes: int = 5) -> tuple[Networks, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    nets = _seeded(ModelSpec("small", num_classes, "reference"), 1)
    seg, disc = dast_to_official(nets)
    assert disc is not None
    return nets, seg, disc


def _small_init(prefix: str, with_tail_shortcut: bool = False) -> dict[str, torch.Tensor]:
    """A DeepLab-style init file for the small backbone: layer4 holds the tail block."""
    nets = _seeded(ModelSpec("small", 5, "reference" if with_tail_shortcut else "paper"), 2)
    n_enc = len(nets.segmentor.encoder.layer4)
    out = {}
    for k, v in nets.segmentor.state_dict().items():
        if k.startswith("classifier."):
            continue
        k = k.replace("encoder.", "", 1).replace("tail.0.", f"layer4.{n_enc}.", 1)
        out[prefix + k] = v
    return out


def test_deeplab_init_paper_variant_misses_nothing_and_class_count_rule() -> None:
    init = _small_init("Scale.")
    init = {k: v for k, v in init.items() if not k.endswith("num_batches_tracked")}
    init["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(21, 256, 3, 3)
    nets, rep = imagenet_to_dast(init, "small", 19, "paper")
    assert rep.missing == [] and rep.skipped == ["Scale.layer5.conv2d_list.0.weight"]
    assert torch.equal(nets.segmentor.state_dict()["tail.0.conv1.weight"], init["Scale.layer4.1.conv1.weight"])
    # the released loader skips the old classifier only for 19 classes
    with pytest.raises(CheckpointError, match=r"unexpected key.*layer5\.conv2d_list\.0\.weight.*num_classes == 19"):
        imagenet_to_dast(init, "small", 16, "paper")
    _, rep16 = imagenet_to_dast(init, "small", 16, "paper", ImportOptions(allow_unexpected=True))
    assert rep16.unexpected == ["Scale.layer5.conv2d_list.0.weight"] and rep16.skipped == []


def test_torchvision_resnet_mapping() -> None:
    src = _small_init("")  # torchvision layout: no prefix, with BN counters
    src["fc.weight"] = torch.zeros(1000, 256)
    src["fc.bias"] = torch.zeros(1000)
    nets, rep = imagenet_to_dast(src, "small", 5, "reference")
    assert rep.source_format == "torchvision" and nets.spec.norm == "imagenet"
    assert rep.skipped == ["fc.weight", "fc.bias"]
    assert [k.rsplit(".", 2)[-2] for k in rep.missing] == ["0", "1", "1", "1", "1"]  # the fresh shortcut
    assert rep.filled == ["segmentor.tail.0.downsample.1.num_batches_tracked"]
    own = nets.segmentor.state_dict()
    assert torch.equal(own["tail.0.bn2.running_mean"], src["layer4.1.bn2.running_mean"])
    assert torch.equal(own["encoder.layer3.0.conv2.weight"], src["layer3.0.conv2.weight"])
    assert int(own["encoder.layer1.0.bn1.num_batches_tracked"]) == 7


def test_torchvision_vgg16_mapping() -> None:
    torch.manual_seed(3)
    src: dict[str, torch.Tensor] = {}
    for i, (cout, cin) in TV_VGG16_CONVS.items():
        src[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3)
        src[f"features.{i}.bias"] = torch.randn(cout)
    for i in (0, 3, 6):  # the fully connected classifier (real shapes are huge; it is skipped)
        src[f"classifier.{i}.weight"] = torch.zeros(2, 2)
    nets, rep = imagenet_to_dast(src, "vgg16", 19)
    assert rep.source_format == "torchvision" and nets.spec.norm == "imagenet"
    assert rep.skipped == ["classifier.0.weight", "classifier.3.weight", "classifier.6.weight"]
    assert rep.missing == [
        "segmentor.tail.0.weight",
        "segmentor.tail.0.bias",
        "segmentor.tail.2.weight",
        "segmentor.tail.2.bias",
    ]
    assert len(rep.loaded) == 26 and rep.unexpected == []
    enc = nets.segmentor.encoder
    assert torch.equal(enc.layer1[0].weight, src["features.0.weight"])
    assert torch.equal(enc.layer1[14].bias, src["features.14.bias"])  # conv3_3
    # the release splits the pool4-less list at positions 16 and 21
    assert torch.equal(enc.layer2[1].weight, src["features.17.weight"])  # conv4_1
    assert torch.equal(enc.layer2[3].weight, src["features.19.weight"])  # conv4_2
    assert torch.equal(enc.layer3[0].weight, src["features.21.weight"])  # conv4_3
    assert torch.equal(enc.layer3[2].weight, src["features.24.weight"])  # conv5_1 (after the removed pool4)
    assert torch.equal(enc.layer3[6].bias, src["features.28.bias"])  # conv5_3
    assert enc.layer3[2].dilation == (2, 2) and enc.layer3[0].dilation == (1, 1)


def test_vgg16_round_trip_through_released_layout() -> None:
    nets = _seeded(ModelSpec("vgg16", 19, "reference"), 4)
    seg, disc = dast_to_official(nets)
    assert {k.split(".")[0] for k in seg} == {"layer1", "layer2", "layer3", "layer4", "classifier"}
    assert "layer4.2.weight" in seg and "layer3.6.bias" in seg and disc is not None
    assert tuple(disc["0.conv1.weight"].shape) == (256, 512, 3, 3)
    back, rep = official_to_dast(seg, disc, "vgg16", 19)
    assert not rep.missing and not rep.unexpected
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(nets.target_model()(x)[0], back.target_model()(x)[0])


def test_official_filled_counters_shape_mismatch_and_unexpected() -> None:
    _, seg, disc = _small_official(5)
    old = {k: v for k, v in seg.items() if not k.endswith("num_batches_tracked")}
    _, rep = official_to_dast(old, None, "small", 5)
    assert rep.filled and all(k.endswith("num_batches_tracked") for k in rep.filled)
    assert rep.missing == [] and "segmentor.encoder.bn1.num_batches_tracked" in rep.filled
    with pytest.raises(
        CheckpointError, match=r"'layer6\.conv2d_list\.0\.weight' has shape \(5, 128, 3, 3\).*expects \(4, 128, 3, 3\)"
    ):
        official_to_dast(seg, disc, "small", 4)
    extra = dict(seg, **{"layer7.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 unexpected key \(e\.g\. 'layer7\.weight'\)"):
        official_to_dast(extra, None, "small", 5)
    _, rep = official_to_dast(extra, None, "small", 5, allow_unexpected=True)
    assert rep.unexpected == ["layer7.weight"]
    partial = {k: v for k, v in seg.items() if not k.startswith("layer6.conv2d_list.3.")}
    with pytest.raises(CheckpointError, match=r"lacks 2 tensors.*layer6|lacks 2 tensors.*classifier\.conv2d_list\.3"):
        official_to_dast(partial, None, "small", 5)


def test_unrecognisable_and_misplaced_files() -> None:
    with pytest.raises(CheckpointError, match="unrecognised weight file for resnet101.*'foo.bar'"):
        imagenet_to_dast({"foo.bar": torch.zeros(1), "baz": torch.zeros(1)}, "resnet101", 19)
    with pytest.raises(CheckpointError, match="not a released DAST segmentor"):
        official_to_dast({"foo.bar": torch.zeros(1)}, None, "resnet101", 19)
    _, seg, disc = _small_official()
    with pytest.raises(CheckpointError, match="not a segmentor; pass it as --discriminators"):
        official_to_dast(disc, None, "small", 5)
    with pytest.raises(CheckpointError, match="holds a ResNet segmentor, but arch 'vgg16'"):
        official_to_dast(seg, None, "vgg16", 5)
    with pytest.raises(CheckpointError, match="use `dast convert official`"):
        imagenet_to_dast(seg, "small", 5)


def test_report_summary_lists_and_abbreviates() -> None:
    rep = ConversionReport(loaded=["a.w"], missing=[f"m.{i}.w" for i in range(20)], unexpected=["u.x"], skipped=[])
    text = rep.summary(max_keys=4)
    assert "1 loaded, 20 missing, 1 unexpected, 0 skipped, 0 filled" in text
    assert "  u.x" in text and "... and 17 more (20 keys in all)" in text
    assert "skipped (" not in text


def test_cli_official_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nets, seg, disc = _small_official(5)
    torch.save(seg, tmp_path / "seg.pth")
    torch.save(disc, tmp_path / "d.pth")
    out = tmp_path / "model.safetensors"
    code = main(
        [
            "convert",
            "official",
            "--segmentor",
            str(tmp_path / "seg.pth"),
            "--discriminators",
            str(tmp_path / "d.pth"),
            "--arch",
            "small",
            "--num-classes",
            "5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "0 missing, 0 unexpected" in printed and "variant reference" in printed
    back, _, meta = load_networks(out)
    assert meta["converted"]["from"] == "official" and back.spec.discoverer and back.spec.input_size == (1024, 512)
    a, b = nets.state_tensors(), back.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_imagenet_and_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    init = _small_init("Scale.")
    torch.save(init, tmp_path / "init.pth")
    out = tmp_path / "init.safetensors"
    assert (
        main(
            [
                "convert",
                "imagenet",
                "--weights",
                str(tmp_path / "init.pth"),
                "--arch",
                "small",
                "--variant",
                "reference",
                "--num-classes",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "format: deeplab" in printed and "segmentor.tail.0.downsample.0.weight" in printed
    back, _, meta = load_networks(out)
    assert back.spec.norm == "caffe" and meta["converted"]["report"]["counts"]["missing"] == 5
    assert torch.equal(back.segmentor.state_dict()["tail.0.conv3.weight"], init["Scale.layer4.1.conv3.weight"])
    # an unrecognisable file and a bad shape are one-line user errors, and nothing is written
    torch.save({"weird": torch.zeros(2)}, tmp_path / "weird.pth")
    bad = tmp_path / "bad.safetensors"
    assert (
        main(["convert", "imagenet", "--weights", str(tmp_path / "weird.pth"), "--arch", "small", "--out", str(bad)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognised weight file") and err.count("\n") == 1
    _, seg, _ = _small_official(5)
    torch.save(seg, tmp_path / "seg.pth")
    assert (
        main(
            [
                "convert",
                "official",
                "--segmentor",
                str(tmp_path / "seg.pth"),
                "--arch",
                "small",
                "--num-classes",
                "3",
                "--out",
                str(bad),
            ]
        )
        == 2
    )
    assert "has shape (5, 128, 3, 3)" in capsys.readouterr().err
    assert not bad.exists() and not list(tmp_path.glob("bad.safetensors*"))
