"""Data-parallel training under ``torchrun`` with PyTorch's DistributedDataParallel.

* The segmentor's two halves E and P are wrapped separately, so the attention can sit
  between them; the discoverer used for the attention is the *unwrapped* module, so DDP
  never waits for discriminator gradients during the segmentor step.
* An iteration runs two segmentor backward passes (source, then target); the first runs
  under ``no_sync`` so gradients are all-reduced once.
* D and C are wrapped together as :class:`AdversaryPair` for the discriminator step.
* Samplers shard every step's global batch across ranks (see :mod:`dast.training.sampler`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dast.config import Config
from dast.models.discriminators import Corrector, Discoverer
from dast.models.io import Networks
from dast.training.runtime import Runtime
from dast.training.step import StepModels


class AdversaryPair(nn.Module):
    """D and C as one module: (f_s, p_s, f_t, p_t) -> (D(f_s), C(p_s), D(f_t), C(p_t))."""

    def __init__(self, discoverer: Discoverer | None, corrector: Corrector | None) -> None:
        super().__init__()
        self.discoverer = discoverer
        self.corrector = corrector

    def forward(
        self, f_s: Tensor | None, p_s: Tensor | None, f_t: Tensor | None, p_t: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        d, c = self.discoverer, self.corrector
        return (
            d(f_s) if (d is not None and f_s is not None) else None,
            c(p_s) if (c is not None and p_s is not None) else None,
            d(f_t) if (d is not None and f_t is not None) else None,
            c(p_t) if (c is not None and p_t is not None) else None,
        )


def _ddp(module: nn.Module, rt: Runtime, find_unused: bool = False) -> DDP:
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


def convert_sync_bn(nets: Networks) -> None:
    """Replace the segmentor's BatchNorm layers by SyncBatchNorm (CUDA only)."""
    seg = nets.segmentor
    seg.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(seg.encoder)
    seg.tail = nn.SyncBatchNorm.convert_sync_batchnorm(seg.tail)


def wrap_for_ddp(nets: Networks, rt: Runtime, cfg: Config) -> StepModels:
    """StepModels whose forward passes and gradient reductions go through DDP."""
    seg = nets.segmentor
    enc = _ddp(seg.encoder, rt)
    predictor = nn.Sequential(seg.tail, seg.classifier)
    unused = getattr(seg.classifier, "active_branches", 0) < len(getattr(seg.classifier, "conv2d_list", []))
    pred = _ddp(predictor, rt, find_unused=unused)

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        with enc.no_sync(), pred.no_sync():
            yield

    adv = cfg.adversarial
    d = nets.discoverer if adv.discoverer else None
    c = nets.corrector if adv.corrector else None
    pair = _ddp(AdversaryPair(d, c), rt) if (d is not None or c is not None) else None
    return StepModels(
        seg, nets.discoverer, nets.corrector, extract=enc, predict=pred, seg_no_sync=no_sync, adversaries=pair
    )
