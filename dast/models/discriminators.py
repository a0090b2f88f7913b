"""The two fully convolutional discriminators of DAST.

* :class:`Discoverer` (D) on the feature map: four 3x3 stride-1 convolutions with
  C/2, C/4, C/8 and 1 channels (C = input channels), LeakyReLU(0.2) in between,
  no sigmoid. Its output forms the attention map.
* :class:`Corrector` (C) on the softmax of the upsampled prediction: five 4x4 stride-2
  convolutions with 64, 128, 256, 512 and 1 channels, LeakyReLU(0.2) in between.

Parameter names follow the released code (``conv1`` .. ``classifier``).
"""

from __future__ import annotations

from torch import Tensor, nn


class Discoverer(nn.Module):
    """D: the feature-level discriminator whose confidence is the attention map."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        if in_channels < 8:
            raise ValueError(f"the discoverer needs at least 8 input channels, got {in_channels}")
        c = in_channels
        self.in_channels = c
        self.conv1 = nn.Conv2d(c, c // 2, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c // 2, c // 4, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(c // 4, c // 8, kernel_size=3, padding=1)
        self.classifier = nn.Conv2d(c // 8, 1, kernel_size=3, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.leaky_relu(self.conv1(x))
        x = self.leaky_relu(self.conv2(x))
        x = self.leaky_relu(self.conv3(x))
        return self.classifier(x)


class Corrector(nn.Module):
    """C: the output-space discriminator (AdaptSegNet's architecture)."""

    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(num_classes, ndf, kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, kernel_size=4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, kernel_size=4, stride=2, padding=1)
        self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.leaky_relu(self.conv1(x))
        x = self.leaky_relu(self.conv2(x))
        x = self.leaky_relu(self.conv3(x))
        x = self.leaky_relu(self.conv4(x))
        return self.classifier(x)
