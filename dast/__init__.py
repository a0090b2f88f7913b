"""DAST: Discriminator Attention and Self-Training for domain-adaptive semantic segmentation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers only; at run time the names are imported on first use
    from dast.inference.segmenter import Prediction, Segmenter

__version__ = "0.1.0"

__all__ = ["Prediction", "Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    # `Segmenter` is imported on first use: `import dast` (and `dast --help`) stays free of torch.
    if name in ("Segmenter", "Prediction"):
        from dast.inference import segmenter  # noqa: PLC0415 - lazy: keeps `import dast` free of torch

        return getattr(segmenter, name)
    raise AttributeError(f"module 'dast' has no attribute {name!r}")
