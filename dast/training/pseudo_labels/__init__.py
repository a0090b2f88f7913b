"""Class-balanced pseudo labels (DAST stage 2), streamed with constant memory.

* :mod:`.thresholds`: the tensor maths; the released sorted-list thresholds, their
  streaming estimator (``histogram`` and ``exact-reference`` modes), the cap, and the two
  labelling rules (``ratio``, released; ``threshold``).
* :mod:`.generate`: running the target model over the target images and writing a set
  (label PNGs, previews, ``stats.json``, ``COMPLETE``).
* :mod:`.quality`: scoring pseudo labels against target labels, from written PNGs
  (:func:`pseudo_label_precision`) or straight from the model for several rules
  (:func:`pseudo_label_quality`).

The public names of all three are importable from here. See ``docs/pseudo_labels.md``.
"""

from dast.palette import CITYSCAPES_COLORS
from dast.palette import (
    palette_for as default_palette,  # the name this package used before dast.palette
)
from dast.training.pseudo_labels.generate import (
    COMPLETE_NAME,
    MARKER_NAME,
    PREVIEW_DIR,
    STATS_NAME,
    colorize,
    estimate_thresholds,
    generate_pseudo_labels,
    label_path,
    label_relpath,
    pseudo_label_set_complete,
    target_probabilities,
)
from dast.training.pseudo_labels.quality import (
    label_scores,
    pseudo_label_precision,
    pseudo_label_quality,
)
from dast.training.pseudo_labels.thresholds import (
    IGNORE_INDEX,
    MODES,
    RULES,
    ThresholdEstimator,
    select_labels,
    sorted_list_confidences,
    sorted_list_thresholds,
)

__all__ = [
    "CITYSCAPES_COLORS",
    "COMPLETE_NAME",
    "IGNORE_INDEX",
    "MARKER_NAME",
    "MODES",
    "PREVIEW_DIR",
    "RULES",
    "STATS_NAME",
    "ThresholdEstimator",
    "colorize",
    "default_palette",
    "estimate_thresholds",
    "generate_pseudo_labels",
    "label_path",
    "label_relpath",
    "label_scores",
    "pseudo_label_precision",
    "pseudo_label_quality",
    "pseudo_label_set_complete",
    "select_labels",
    "sorted_list_confidences",
    "sorted_list_thresholds",
    "target_probabilities",
]
