"""Networks of DAST: DeepLab-v2 segmentors, the discoverer D, the corrector C, attention."""

from dast.models.attention import attend, attention_map
from dast.models.build import build_corrector, build_discoverer, build_segmentor, build_target_model
from dast.models.discriminators import Corrector, Discoverer
from dast.models.segmentor import Segmentor
from dast.models.target_model import TargetModel

__all__ = [
    "Corrector",
    "Discoverer",
    "Segmentor",
    "TargetModel",
    "attend",
    "attention_map",
    "build_corrector",
    "build_discoverer",
    "build_segmentor",
    "build_target_model",
]
