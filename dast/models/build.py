"""Factories for the networks, keyed by architecture name and variant.

Variants (see ``docs/variants.md``):

* ``paper``: the paper's text. Four ASPP branches summed; the split-off last ResNet
  block keeps its identity shortcut.
* ``reference``: the released code. Only the first two ASPP branches are summed, and
  the split-off block has a freshly initialised 1x1 projection shortcut.

``timm`` builds any timm backbone as the encoder (:mod:`dast.models.timm_backbone`,
``docs/backbones.md``); it has only the ``paper`` variant.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from dast.models.aspp import ASPPClassifier
from dast.models.discriminators import Corrector, Discoverer
from dast.models.resnet import (
    ResNetEncoder,
    deeplab_init,
    kaiming_init,
    resnet_tail,
    zero_init_residuals,
)
from dast.models.segmentor import Encoder, Segmentor
from dast.models.target_model import TargetModel
from dast.models.timm_backbone import build_timm_segmentor
from dast.models.vgg import VGGEncoder, vgg_tail

ARCHS = ("resnet101", "vgg16", "small", "timm")
VARIANTS = ("paper", "reference")
Variant = Literal["paper", "reference"]

# Small backbone (the demo's network, trained from scratch): a caffe-style ResNet with
# one bottleneck per stage, a 24-channel stem, bottleneck width 4 (128 feature channels)
# and zero-initialised residual branches; output stride 8, or 4 on request. Chosen so that
# the demo's oracle learns every synthetic class within its 1000 steps on one CPU thread
# (docs/synthetic.md, "Learnability").
SMALL_LAYERS = (1, 1, 1, 1)
SMALL_WIDTH = 4
SMALL_STEM = 24
SMALL_RATES = (1, 2, 3, 4)
SMALL_OUTPUT_STRIDES = (4, 8)
PAPER_RATES = (6, 12, 18, 24)


def _check(arch: str, variant: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def check_output_stride(arch: str, output_stride: int | None) -> int:
    """The output stride ``arch`` runs at: ``None`` is its default (8); a ``ValueError`` for
    a stride the architecture does not support (``timm`` backbones are checked by
    :func:`~dast.models.timm_backbone.build_timm_segmentor`, per family)."""
    allowed = SMALL_OUTPUT_STRIDES if arch == "small" else (8,)
    if output_stride is None:
        return 8
    if output_stride not in allowed:
        raise ValueError(
            f"output stride {output_stride} is not supported by the {arch} architecture "
            f"(supported: {', '.join(map(str, allowed))})"
        )
    return int(output_stride)


def build_segmentor(
    arch: str,
    num_classes: int,
    variant: str = "paper",
    output_stride: int | None = None,
    *,
    timm_name: str | None = None,
    pretrained: bool = False,
) -> Segmentor:
    """Build a DeepLab-v2 segmentor with random weights (load pretrained ones afterwards).

    ``output_stride`` (None: 8) may be 4 for ``small``; the paper networks run at 8 only.
    ``arch="timm"`` needs ``timm_name``; ``pretrained`` (timm's own weights) applies to it alone.
    """
    _check(arch, variant)
    if arch == "timm":
        if timm_name is None:
            raise ValueError("arch 'timm' needs a timm model name")
        if variant == "reference":
            raise ValueError("arch 'timm' has no reference variant (the released quirks are DeepLab-specific)")
        return build_timm_segmentor(timm_name, num_classes, output_stride, pretrained)
    stride = check_output_stride(arch, output_stride)
    reference = variant == "reference"
    active = 2 if reference else None
    if arch == "vgg16":
        encoder: Encoder = VGGEncoder()
        tail = vgg_tail()
        classifier = ASPPClassifier(1024, num_classes, PAPER_RATES, active)
        return Segmentor(encoder, tail, classifier, num_classes)
    if arch == "resnet101":
        encoder = ResNetEncoder((3, 4, 23, 2), 64, freeze_bn_affine=True)
        tail = resnet_tail(64, fresh_shortcut=reference, freeze_bn_affine=True)
        deeplab_init(encoder)
        deeplab_init(tail)
        classifier = ASPPClassifier(encoder.out_channels, num_classes, PAPER_RATES, active)
        return Segmentor(encoder, tail, classifier, num_classes)
    encoder = ResNetEncoder(
        SMALL_LAYERS, SMALL_WIDTH, freeze_bn_affine=False, output_stride=stride, stem_width=SMALL_STEM
    )
    tail = resnet_tail(SMALL_WIDTH, fresh_shortcut=reference, freeze_bn_affine=False)
    for part in (encoder, tail):
        kaiming_init(part)
        zero_init_residuals(part)
    classifier = ASPPClassifier(encoder.out_channels, num_classes, SMALL_RATES, active)
    return Segmentor(encoder, tail, classifier, num_classes)


def build_discoverer(feature_channels: int) -> Discoverer:
    """D with channels C/2, C/4, C/8, 1."""
    return Discoverer(feature_channels)


def build_corrector(num_classes: int, width: int = 64) -> Corrector:
    """C with channels w, 2w, 4w, 8w, 1 (the paper: w = 64)."""
    return Corrector(num_classes, ndf=width)


def build_target_model(segmentor: Segmentor, discoverer: Discoverer | None) -> TargetModel:
    """The deployable target-domain model."""
    return TargetModel(segmentor, discoverer)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
