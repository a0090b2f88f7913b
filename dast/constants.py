"""Constants shared by every layer of dast."""

from __future__ import annotations

IGNORE_INDEX = 255
"""The label value of pixels that no loss or metric counts (Cityscapes' convention)."""
