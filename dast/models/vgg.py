"""DeepLab-v2 VGG-16 in the layout of the released DAST code.

pool4 and pool5 are removed, conv5_1..3 have dilation 2 (padding 2), and fc6/fc7 are
3x3 convolutions with dilation 4 and 1024 channels. Output stride 8. The attention acts
on the 512-channel conv5_3 output, before fc6.

Module indices follow torchvision's ``vgg16().features`` after removing pool4 and pool5,
split into ``layer1`` (indices 0-15), ``layer2`` (16-20) and ``layer3`` (21-28), so the
released state-dict keys map one to one.
"""

from __future__ import annotations

from torch import Tensor, nn

from dast.models.segmentor import Encoder

# torchvision vgg16 "features" indices of the convolutions, with their (in, out) channels
_VGG16_CONVS = {
    0: (3, 64), 2: (64, 64),
    5: (64, 128), 7: (128, 128),
    10: (128, 256), 12: (256, 256), 14: (256, 256),
    17: (256, 512), 19: (512, 512), 21: (512, 512),
    24: (512, 512), 26: (512, 512), 28: (512, 512),
}  # fmt: skip
_POOLS = (4, 9, 16, 23, 30)
_KEPT = [i for i in range(30) if i != 23]  # pool4 (23) and pool5 (30) removed
_DILATED = (24, 26, 28)  # conv5_1..3
LAYER_SPLITS = ((0, 16), (16, 21), (21, 29))  # positions in the kept list


def torchvision_feature_index_map() -> dict[int, tuple[int, int]]:
    """Map a torchvision ``features.i`` conv index to (layer number 1-3, index in that layer)."""
    out: dict[int, tuple[int, int]] = {}
    for layer_no, (a, b) in enumerate(LAYER_SPLITS, start=1):
        for pos in range(a, b):
            orig = _KEPT[pos]
            if orig in _VGG16_CONVS:
                out[orig] = (layer_no, pos - a)
    return out


def _module_for(orig_index: int) -> nn.Module:
    if orig_index in _VGG16_CONVS:
        cin, cout = _VGG16_CONVS[orig_index]
        d = 2 if orig_index in _DILATED else 1
        return nn.Conv2d(cin, cout, kernel_size=3, padding=d, dilation=d)
    if orig_index in _POOLS:
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.ReLU(inplace=True)


class VGGEncoder(Encoder):
    """E of the VGG-16 segmentor: conv1_1 .. conv5_3 (with ReLU), output stride 8."""

    def __init__(self) -> None:
        super().__init__()
        mods = [_module_for(i) for i in _KEPT]
        self.layer1 = nn.Sequential(*mods[0:16])
        self.layer2 = nn.Sequential(*mods[16:21])
        self.layer3 = nn.Sequential(*mods[21:29])
        self.out_channels = 512

    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]

    def forward(self, x: Tensor) -> Tensor:
        return self.layer3(self.layer2(self.layer1(x)))


def vgg_tail() -> nn.Sequential:
    """fc6 and fc7 as dilated 3x3 convolutions with 1024 channels, each followed by ReLU."""
    return nn.Sequential(
        nn.Conv2d(512, 1024, kernel_size=3, padding=4, dilation=4),
        nn.ReLU(inplace=True),
        nn.Conv2d(1024, 1024, kernel_size=3, padding=4, dilation=4),
        nn.ReLU(inplace=True),
    )
