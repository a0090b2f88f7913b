"""The segmentor S = P o E, split at the attention point.

``f = segmentor.extract(x)`` is E; ``logits = segmentor.predict(f)`` is P (the tail stage
and the ASPP classifier). The training loop and :class:`~dast.models.TargetModel` apply
the discriminator attention between the two halves; the segmentor itself never sees a
discriminator.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn


class Encoder(nn.Module):
    """E: images -> the feature map at the attention point, ``out_channels`` wide.

    The ResNet, VGG and timm encoders derive from it; each sets ``out_channels`` and lists
    its top-level stages.
    """

    out_channels: int

    def stages(self) -> list[nn.Module]:
        """Top-level stages in the order of the released parameter generator."""
        return list(self.children())


class Segmentor(nn.Module):
    """DeepLab-v2 segmentor composed of an encoder, a tail stage and a classifier."""

    def __init__(self, encoder: Encoder, tail: nn.Module, classifier: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.tail = tail
        self.classifier = classifier
        self.num_classes = num_classes
        self.feature_channels: int = int(encoder.out_channels)

    def extract(self, x: Tensor) -> Tensor:
        """E: the feature map at the attention point (output stride 8 for the DeepLab backbones; a timm
        backbone's own; 4 or 8 for the small one)."""
        return self.encoder(x)

    def predict(self, features: Tensor) -> Tensor:
        """P: logits at feature resolution from (possibly attended) features."""
        return self.classifier(self.tail(features))

    def forward(self, x: Tensor) -> Tensor:
        """The source path: logits without attention."""
        return self.predict(self.extract(x))

    def stages(self) -> list[nn.Module]:
        """Top-level stages of the backbone in the released order (classifier excluded)."""
        return [*self.encoder.stages(), self.tail]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of E and the tail (the 1x learning-rate group)."""
        for m in (self.encoder, self.tail):
            for p in m.parameters():
                if p.requires_grad:
                    yield p

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the classifier (the 10x learning-rate group)."""
        for p in self.classifier.parameters():
            if p.requires_grad:
                yield p
