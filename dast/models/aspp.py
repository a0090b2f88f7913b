"""The ASPP-v2 classifier of DeepLab-v2: a sum of dilated 3x3 convolutions."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ASPPClassifier(nn.Module):
    """Sum of parallel dilated 3x3 convolutions with bias.

    ``active_branches`` is how many of the branches are summed. The released DAST code
    returns inside its summation loop, so it sums only the first two (rates 6 and 12)
    while all four exist in the state dict; the ``reference`` variant sets it to 2.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18, 24),
        active_branches: int | None = None,
    ) -> None:
        super().__init__()
        convs = [nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=r, dilation=r, bias=True) for r in rates]
        for conv in convs:
            nn.init.normal_(conv.weight, 0.0, 0.01)
        self.conv2d_list = nn.ModuleList(convs)
        n = len(self.conv2d_list)
        self.active_branches = n if active_branches is None else min(int(active_branches), n)
        if self.active_branches < 1:
            raise ValueError("the classifier needs at least one active branch")

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2d_list[0](x)
        for i in range(1, self.active_branches):
            out = out + self.conv2d_list[i](x)
        return out
