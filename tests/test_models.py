"""Networks: shapes, output stride, parameter counts, variants, attention gradients."""

from __future__ import annotations

import pytest
import torch

from dast.checkpoint import read_meta
from dast.errors import CheckpointError
from dast.models import attend, attention_map, build_corrector, build_discoverer, build_segmentor
from dast.models.build import count_parameters
from dast.models.io import ModelSpec, build_networks, load_networks, save_networks
from dast.models.resnet import Bottleneck, ResNetEncoder
from dast.models.target_model import TargetModel


def test_released_resnet101_parameter_counts() -> None:
    seg = build_segmentor("resnet101", 19, "reference")
    assert count_parameters(seg) == 48_099_468
    assert count_parameters(seg, trainable_only=True) == 47_990_028
    assert count_parameters(build_discoverer(2048)) == 24_776_705
    assert count_parameters(build_corrector(19)) == 2_781_121


def test_paper_resnet_last_block_has_identity_shortcut() -> None:
    ref = build_segmentor("resnet101", 19, "reference")
    paper = build_segmentor("resnet101", 19, "paper")
    assert ref.tail[0].downsample is not None  # the released builder's fresh 1x1 shortcut
    assert paper.tail[0].downsample is None
    # the fresh shortcut is a 2048 -> 2048 1x1 conv plus its BN (affine frozen)
    assert count_parameters(ref) - count_parameters(paper) == 2048 * 2048 + 2 * 2048
    assert count_parameters(ref, True) - count_parameters(paper, True) == 2048 * 2048


def test_bn_affine_frozen_in_resnet101() -> None:
    seg = build_segmentor("resnet101", 19, "paper")
    for m in seg.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert not m.weight.requires_grad and not m.bias.requires_grad


@pytest.mark.parametrize("arch,channels,hw", [("small", 128, (9, 13)), ("vgg16", 512, (8, 12))])
def test_output_stride_8_and_shapes(arch: str, channels: int, hw: tuple[int, int]) -> None:
    # ResNet's ceil-mode max-pool gives H/8 + 1 for multiples of 8 (as released); VGG gives H/8
    seg = build_segmentor(arch, 5, "paper").eval()
    x = torch.randn(1, 3, 64, 96)
    f = seg.extract(x)
    assert f.shape == (1, channels, *hw)
    assert seg.predict(f).shape == (1, 5, *hw)


def test_small_output_stride_4_keeps_the_parameters_and_doubles_the_resolution() -> None:
    torch.manual_seed(0)
    os8 = build_segmentor("small", 5, "paper").eval()
    os4 = build_segmentor("small", 5, "paper", output_stride=4).eval()
    os4.load_state_dict(os8.state_dict())  # the same tensors: only layer2's stride differs
    assert os8.encoder.layer2[0].conv1.stride == (2, 2) and os4.encoder.layer2[0].conv1.stride == (1, 1)
    assert os8.encoder.layer2[0].downsample[0].stride == (2, 2) and os4.encoder.layer2[0].downsample[0].stride == (1, 1)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert os4.extract(x).shape == (1, 128, 17, 25)  # 64x96 -> stem and ceil-mode pool 17x25
        assert os4(x).shape == (1, 5, 17, 25)


@pytest.mark.parametrize("arch,stride", [("small", 16), ("small", 2), ("resnet101", 4), ("vgg16", 16)])
def test_unsupported_output_stride_is_a_clear_error(arch: str, stride: int) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^output stride {stride} is not supported by the {arch} architecture "
        rf"\(supported: {'4, 8' if arch == 'small' else '8'}\)$",
    ):
        build_segmentor(arch, 5, "paper", output_stride=stride)


def test_small_backbone_shape_and_zero_initialised_residual_branches() -> None:
    seg = build_segmentor("small", 5, "paper")
    enc = seg.encoder
    assert enc.conv1.out_channels == 24 and seg.feature_channels == 128
    assert [len(stage) for stage in (enc.layer1, enc.layer2, enc.layer3, enc.layer4, seg.tail)] == [1, 1, 1, 1, 1]
    blocks = [m for m in seg.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 5 and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.count_nonzero(b.bn1.weight) == b.bn1.weight.numel() for b in blocks)
    # so a block starts as its shortcut: the identity-shortcut tail passes a non-negative input through
    f = torch.relu(torch.randn(2, 128, 5, 7))
    with torch.no_grad():
        assert torch.equal(seg.tail.eval()(f), f)


def test_resnet_ceil_mode_output_size() -> None:
    # the released maxpool uses ceil_mode=True: 512x1024 -> 65x129 features

    enc = ResNetEncoder((1, 1, 1, 1), width=4, freeze_bn_affine=False).eval()
    with torch.no_grad():
        f = enc(torch.zeros(1, 3, 512, 1024))
    assert f.shape[-2:] == (65, 129)


def test_reference_aspp_sums_two_branches_paper_sums_four() -> None:
    torch.manual_seed(0)
    ref = build_segmentor("small", 4, "reference").eval()
    paper = build_segmentor("small", 4, "paper").eval()
    paper.load_state_dict(ref.state_dict(), strict=False)  # paper has no tail shortcut
    f = torch.randn(1, ref.feature_channels, 6, 6)
    convs = ref.classifier.conv2d_list
    with torch.no_grad():
        two = convs[0](f) + convs[1](f)
        four = two + convs[2](f) + convs[3](f)
        assert torch.allclose(ref.classifier(f), two, atol=1e-6)
        assert torch.allclose(paper.classifier(f), four, atol=1e-6)
    assert len(ref.state_dict()) - len(paper.state_dict()) == 6  # conv + 5 BN entries


def test_discriminator_channels() -> None:
    d = build_discoverer(64)
    assert [m.out_channels for m in (d.conv1, d.conv2, d.conv3, d.classifier)] == [32, 16, 8, 1]
    c = build_corrector(7)
    assert [m.out_channels for m in (c.conv1, c.conv2, c.conv3, c.conv4, c.classifier)] == [64, 128, 256, 512, 1]
    assert c(torch.randn(2, 7, 64, 64)).shape == (2, 1, 2, 2)


def test_attention_formula() -> None:
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 4.0]]]])  # 1 x 2 x 1 x 2
    d = torch.tensor([[[[0.5, -1.0]]]])
    out, alpha = attend(f, d)
    a = torch.abs(torch.tanh(d))
    assert torch.allclose(alpha, a)
    assert torch.allclose(out, f + f * a)
    assert torch.allclose(attention_map(torch.tensor([-100.0])), torch.tensor([1.0]))


def test_gradient_reaches_encoder_through_attention_with_frozen_discoverer() -> None:
    torch.manual_seed(0)
    seg = build_segmentor("small", 3, "paper")
    disc = build_discoverer(seg.feature_channels)
    for p in disc.parameters():
        p.requires_grad_(False)
    before = [p.clone() for p in disc.parameters()]
    x = torch.randn(1, 3, 48, 48)
    f = seg.extract(x)
    d = disc(f)
    # loss that depends on E only through the discoverer
    loss = attention_map(d).sum()
    loss.backward()
    enc_grads = [p.grad for p in seg.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in enc_grads)
    assert all(p.grad is None for p in disc.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters()))


def test_target_model_matches_manual_attention_path() -> None:
    torch.manual_seed(0)
    seg = build_segmentor("small", 3, "paper").eval()
    disc = build_discoverer(seg.feature_channels).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        logits, alpha = TargetModel(seg, disc)(x)
        f = seg.extract(x)
        manual = seg.predict(f + f * torch.abs(torch.tanh(disc(f))))
        plain, zero = TargetModel(seg, None)(x)
    assert torch.allclose(logits, manual, atol=1e-6)
    assert alpha.shape == (2, 1, 6, 8)
    assert torch.allclose(plain, seg(x)) and torch.count_nonzero(zero) == 0


def test_checkpoint_records_the_output_stride(tmp_path) -> None:
    torch.manual_seed(0)
    nets = build_networks(ModelSpec(arch="small", num_classes=4, norm="unit", output_stride=4))
    save_networks(tmp_path / "os4.safetensors", nets)
    assert read_meta(tmp_path / "os4.safetensors")["model"]["output_stride"] == 4
    loaded, _, _ = load_networks(tmp_path / "os4.safetensors")
    assert loaded.spec.output_stride == 4 and loaded.segmentor.encoder.layer2[0].conv1.stride == (1, 1)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded.target_model().eval()(x)[0], nets.target_model().eval()(x)[0])
    # a spec this version cannot build is a checkpoint error, not a crash
    bad = ModelSpec(arch="small", num_classes=4, norm="unit")
    save_networks(
        tmp_path / "os16.safetensors", build_networks(bad), extra_meta={"model": {**bad.to_dict(), "output_stride": 16}}
    )
    with pytest.raises(CheckpointError, match="output stride 16 is not supported by the small architecture"):
        load_networks(tmp_path / "os16.safetensors")
