"""The demo's online-stage mechanism: label precision of a model, counted by hand."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from dast.demo.mechanisms import label_scores


class _Fixed(nn.Module):
    """A target model whose logits are given (1 x C x H x W), whatever the image."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits, torch.zeros_like(self.logits[:, :1])


class _Val:
    """One labelled image (what label_scores reads of a dataset)."""

    num_classes = 3
    table = SimpleNamespace(names=("a", "b", "c"))

    def __init__(self, label: torch.Tensor) -> None:
        self.label = label

    def __len__(self) -> int:
        return 1

    def item_or_none(self, i: int, augment: bool = True) -> dict[str, torch.Tensor]:
        return {"image": torch.zeros(3, 1, 2), "label": self.label}  # H x W = 1 x 2


def test_label_scores_by_hand() -> None:
    # 1 x 2 pixels, 3 classes: pixel 0 predicts class 0 with p = 0.98 (right),
    # pixel 1 predicts class 1 with p ~ 0.58 (wrong: the label is 2)
    logits = torch.tensor([[[[5.0, 1.0]], [[0.0, 1.5]], [[0.0, 1.0]]]])
    label = torch.tensor([[0, 2]])
    val = _Val(label)
    s = label_scores(_Fixed(logits), val, threshold=0.9)
    assert s["precision"] == 50.0  # one of two labelled pixels
    assert s["confident_share"] == 50.0 and s["confident_precision"] == 100.0  # only pixel 0 is >= 0.9
    assert s["per_class_precision"] == {"a": 100.0, "b": 0.0, "c": None}  # c is never predicted
    label[0, 1] = 255  # an ignored pixel counts nowhere
    s = label_scores(_Fixed(logits), val, threshold=0.9)
    assert s["precision"] == 100.0 and s["confident_share"] == 100.0
