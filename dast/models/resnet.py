"""DeepLab-v2 ResNet in the layout of the released DAST code.

* caffe-style bottlenecks: the stride sits on the first 1x1 convolution;
* 7x7/2 stem, 3x3/2 max-pool with padding 1 and ``ceil_mode=True``;
* layer3 dilation 2, layer4 dilation 4, both stride 1: output stride 8 (the small demo
  backbone may also run layer2 at stride 1: output stride 4);
* the last block of layer4 is split off as a separate stage (the "tail", ``layer5`` in
  the released code). The attention acts between layer4 and the tail.

BatchNorm affine parameters can be frozen (``requires_grad=False``) as in the release;
the modules still run in train mode, so running statistics are updated.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dast.models.segmentor import Encoder


def _frozen_bn(channels: int, freeze_affine: bool) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, affine=True)
    if freeze_affine:
        for p in bn.parameters():
            p.requires_grad = False
    return bn


class Bottleneck(nn.Module):
    """Caffe-style bottleneck: 1x1 (stride) -> 3x3 (dilation) -> 1x1, with an optional shortcut conv."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        freeze_bn_affine: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = _frozen_bn(planes, freeze_bn_affine)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _frozen_bn(planes, freeze_bn_affine)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = _frozen_bn(planes * 4, freeze_bn_affine)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


def _shortcut(inplanes: int, outplanes: int, stride: int, freeze_bn_affine: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
        _frozen_bn(outplanes, freeze_bn_affine),
    )


def make_stage(
    inplanes: int,
    planes: int,
    blocks: int,
    stride: int = 1,
    dilation: int = 1,
    force_shortcut: bool = False,
    freeze_bn_affine: bool = True,
) -> nn.Sequential:
    """A stage of bottlenecks. The first block gets a projection shortcut when the shape
    changes, or when ``force_shortcut`` (the released builder adds one whenever the
    dilation is 2 or 4)."""
    downsample = None
    if stride != 1 or inplanes != planes * 4 or force_shortcut:
        downsample = _shortcut(inplanes, planes * 4, stride, freeze_bn_affine)
    layers = [Bottleneck(inplanes, planes, stride, dilation, downsample, freeze_bn_affine)]
    for _ in range(1, blocks):
        layers.append(Bottleneck(planes * 4, planes, 1, dilation, None, freeze_bn_affine))
    return nn.Sequential(*layers)


class ResNetEncoder(Encoder):
    """E of the segmentor: stem, layer1..layer4 (layer4 without its last block).

    The stem (``stem_width`` channels, default ``width``) divides the resolution by 4;
    layer2 by ``output_stride // 4`` (2 in the paper's networks, 1 for output stride 4).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 23, 2),
        width: int = 64,
        freeze_bn_affine: bool = True,
        output_stride: int = 8,
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (4, 8):
            raise ValueError(f"the ResNet encoder supports output stride 4 or 8, got {output_stride}")
        w = width
        stem = w if stem_width is None else stem_width
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _frozen_bn(stem, freeze_bn_affine)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        fb = freeze_bn_affine
        self.layer1 = make_stage(stem, w, layers[0], freeze_bn_affine=fb)
        self.layer2 = make_stage(w * 4, w * 2, layers[1], stride=output_stride // 4, freeze_bn_affine=fb)
        self.layer3 = make_stage(w * 8, w * 4, layers[2], dilation=2, force_shortcut=True, freeze_bn_affine=fb)
        self.layer4 = make_stage(w * 16, w * 8, layers[3], dilation=4, force_shortcut=True, freeze_bn_affine=fb)
        self.out_channels = w * 32

    def stages(self) -> list[nn.Module]:
        """Top-level stages in the order of the released parameter generator."""
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet_tail(width: int = 64, fresh_shortcut: bool = False, freeze_bn_affine: bool = True) -> nn.Sequential:
    """The split-off last block of layer4 (``layer5`` in the released code).

    ``fresh_shortcut=True`` reproduces the released builder, which gives this block a
    freshly initialised 1x1 projection shortcut with BN because its dilation is 4.
    Otherwise it is the plain identity-shortcut block of ResNet.
    """
    return make_stage(
        width * 32, width * 8, 1, dilation=4, force_shortcut=fresh_shortcut, freeze_bn_affine=freeze_bn_affine
    )


def deeplab_init(module: nn.Module) -> None:
    """The released initialisation: convs N(0, 0.01), BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def kaiming_init(module: nn.Module) -> None:
    """He initialisation for networks trained from scratch (the small demo backbone)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def zero_init_residuals(module: nn.Module) -> None:
    """Set the last BatchNorm weight of every bottleneck to 0, so that each block starts as
    its shortcut and the residual branches grow from there (Goyal et al., 2017; torchvision's
    ``zero_init_residual``). Used for the small backbone, trained from scratch."""
    for m in module.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
