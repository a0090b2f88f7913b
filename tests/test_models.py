"""Networks: shapes, output stride, parameter counts, variants, attention gradients."""

from __future__ import annotations

import pytest
import torch

from dast.models import attend, attention_map, build_corrector, build_discoverer, build_segmentor
from dast.models.build import count_parameters
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


@pytest.mark.parametrize("arch,channels,hw", [("small", 256, (9, 13)), ("vgg16", 512, (8, 12))])
def test_output_stride_8_and_shapes(arch: str, channels: int, hw: tuple[int, int]) -> None:
    # ResNet's ceil-mode max-pool gives H/8 + 1 for multiples of 8 (as released); VGG gives H/8
    seg = build_segmentor(arch, 5, "paper").eval()
    x = torch.randn(1, 3, 64, 96)
    f = seg.extract(x)
    assert f.shape == (1, channels, *hw)
    assert seg.predict(f).shape == (1, 5, *hw)


def test_resnet_ceil_mode_output_size() -> None:
    # the released maxpool uses ceil_mode=True: 512x1024 -> 65x129 features
    from dast.models.resnet import ResNetEncoder

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
