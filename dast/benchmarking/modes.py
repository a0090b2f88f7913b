"""Execution modes of the benchmarks, and a training setup built for one mode.

A mode is a named set of speed settings; :func:`resolve_mode` turns it into what a
device can actually run (channels_last and CUDA graphs only on CUDA, bf16 only where
supported). ``eager-fp32`` is the released code's way: fp32, D(f_t) evaluated three
times, the released duplicated SGD in stage 1, NCHW.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn

from dast.errors import UserError
from dast.models import build_corrector, build_discoverer, build_segmentor
from dast.training.fast import (
    GraphedStep,
    autocast_factory,
    bf16_supported,
    compile_segmentor,
    fast_optimizers,
    to_channels_last,
)
from dast.training.optim import discriminator_optimizer, poly_lr, segmentor_optimizer, set_lrs
from dast.training.step import StepModels, StepSettings, train_step


@dataclass(frozen=True)
class Mode:
    """Requested speed settings (``None`` for channels_last: on CUDA only)."""

    amp: str  # "none" | "bf16"
    channels_last: bool | None
    reuse_discoverer: bool
    optimizers: str  # "released" | "foreach"
    cuda_graph: bool
    compile: bool
    about: str


MODES: dict[str, Mode] = {
    "eager-fp32": Mode("none", False, False, "released", False, False,
                       "the released code's way: fp32 (TF32 convolutions on CUDA), D three times, released SGD"),
    "eager-bf16": Mode("bf16", False, False, "released", False, False, "eager-fp32 under bf16 autocast"),
    "fast-nograph": Mode("bf16", None, True, "foreach", False, False,
                         "bf16, channels_last (CUDA), D once, foreach optimisers; eager"),
    "fast": Mode("bf16", None, True, "foreach", True, False,
                 "fast-nograph plus the whole step as CUDA graphs (CUDA only)"),
    "fast-compile": Mode("bf16", None, True, "foreach", False, True,
                         "fast-nograph plus torch.compile of the segmentor halves"),
    "fast-fp32": Mode("none", None, True, "foreach", True, False,
                      "the fast mode without bf16: fp32 (TF32 convolutions on CUDA), channels_last (CUDA), "
                      "D once, foreach optimisers, CUDA graphs (CUDA)"),
}


@dataclass(frozen=True)
class ResolvedMode:
    """What a mode runs on one device."""

    name: str
    amp_dtype: torch.dtype | None
    channels_last: bool
    reuse_discoverer: bool
    optimizers: str
    cuda_graph: bool
    compile: bool

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["amp"] = {None: "none", torch.bfloat16: "bf16"}.get(self.amp_dtype, str(self.amp_dtype))
        del d["amp_dtype"], d["name"]
        return d

    def autocast(self, device: torch.device) -> Callable[[], ContextManager[Any]]:
        return autocast_factory(device, self.amp_dtype)


def parse_modes(text: str) -> list[str]:
    """Comma-separated mode names, checked; ``eager-fp32`` first when present."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--modes is empty")
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise UserError(f"unknown mode {unknown[0]!r} in --modes; choose from {', '.join(MODES)}")
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: n != "eager-fp32")


def resolve_mode(name: str, device: torch.device) -> ResolvedMode:
    """The settings of mode ``name`` that ``device`` supports."""
    m = MODES[name]
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if m.amp == "bf16" and bf16_supported(device) else None
    cl = cuda if m.channels_last is None else m.channels_last
    return ResolvedMode(name, amp, cl, m.reuse_discoverer, m.optimizers, m.cuda_graph and cuda, m.compile)


# ---------------------------------------------------------------------------------------
# Training setups


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings of a stage (defaults: the released stage 1)."""

    lr: float = 2.5e-4
    head_lr_mult: float = 10.0
    duplicate_params: bool = True
    poly_steps: int = 250_000
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9


STAGE1 = Schedule()
STAGE2 = Schedule(lr=2e-4, head_lr_mult=1.0, duplicate_params=False, poly_steps=100_000)


def build_nets(arch: str, num_classes: int, variant: str, seed: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(segmentor, discoverer, corrector) with random weights from ``seed``."""
    torch.manual_seed(seed)
    seg = build_segmentor(arch, num_classes, variant)
    return seg, build_discoverer(seg.feature_channels), build_corrector(num_classes)


class TrainingSetup:
    """Networks, optimisers and the step function of one mode, ready to iterate.

    ``step(i, xs, ys, xt, yt)`` sets the poly learning rates of iteration ``i`` and runs
    one iteration (graph-replayed in CUDA-graph modes). The networks are moved to
    ``device`` and converted to channels_last / compiled as the mode says.
    """

    def __init__(self, mode: ResolvedMode, nets: tuple[nn.Module, nn.Module, nn.Module], device: torch.device,
                 schedule: Schedule = STAGE1, *, graph_warmup: int = 3) -> None:
        seg, disc, corr = (m.to(device) for m in nets)
        for m in (seg, disc, corr):
            m.train()
        if mode.channels_last:
            to_channels_last(seg, disc, corr)
        if mode.compile:
            compile_segmentor(seg)
        self.mode, self.device, self.schedule = mode, device, schedule
        self.segmentor, self.discoverer, self.corrector = seg, disc, corr
        s = schedule
        if mode.optimizers == "released":
            self.seg_opt: torch.optim.Optimizer = segmentor_optimizer(
                seg, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                head_lr_mult=s.head_lr_mult, duplicate_params=s.duplicate_params)
            self.disc_opt = discriminator_optimizer([disc, corr], s.lr_d, s.betas)
        else:
            self.seg_opt, self.disc_opt = fast_optimizers(  # type: ignore[assignment]
                seg, [disc, corr], lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                head_lr_mult=s.head_lr_mult, duplicate_params=s.duplicate_params, lr_d=s.lr_d, betas=s.betas,
                tensor_lr=mode.cuda_graph)
        self.mults = [1.0] if len(self.seg_opt.param_groups) == 1 else [1.0, s.head_lr_mult]
        self.settings = StepSettings(reuse_discoverer=mode.reuse_discoverer)
        self.models = StepModels(seg, disc, corr)
        self.autocast = mode.autocast(device)
        self.graphed = (GraphedStep(self.models, self.seg_opt, self.disc_opt, self.settings, mode.amp_dtype,
                                    warmup=graph_warmup) if mode.cuda_graph else None)

    def prepare_images(self, x: Tensor) -> Tensor:
        """Images on the device, channels_last when the mode uses it."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.mode.channels_last else x

    def step(self, i: int, xs: Tensor, ys: Tensor, xt: Tensor, yt: Tensor | None) -> tuple[dict[str, Tensor], bool]:
        s = self.schedule
        set_lrs(self.seg_opt, poly_lr(s.lr, i, s.poly_steps, s.power), self.mults)
        if self.disc_opt is not None:
            set_lrs(self.disc_opt, poly_lr(s.lr_d, i, s.poly_steps, s.power), [1.0])
        if self.graphed is not None:
            return self.graphed(xs, ys, xt, yt)
        return train_step(self.models, self.seg_opt, self.disc_opt, xs, ys, xt, yt, self.settings, self.autocast)
