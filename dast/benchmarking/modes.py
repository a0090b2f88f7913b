"""Execution modes of the benchmarks, and a training setup built for one mode.

A mode is a named request for speed levers; :func:`resolve_mode` turns it into the levers
a device runs (:func:`dast.training.levers.choose_levers`: channels_last and CUDA graphs
only on CUDA, bf16 only where the device computes it natively), with the reason for each.
``eager-fp32`` is the released code's way: fp32, D(f_t) evaluated three times, the
released duplicated SGD in stage 1, NCHW. A :class:`TrainingSetup` builds its iteration
with :class:`dast.training.engine.Engine` from the config :func:`bench_config` writes, so
the benchmark times what ``dast train`` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dast.config import Config, RuntimeConfig, deep_merge, from_tree, resolve
from dast.contexts import amp_name, autocast_factory
from dast.errors import UserError
from dast.models import build_corrector, build_discoverer, build_segmentor
from dast.models.discriminators import Corrector, Discoverer
from dast.models.io import ModelSpec, Networks
from dast.models.segmentor import Segmentor
from dast.training.engine import Engine
from dast.training.graphs import GraphedStep, GraphedUpdate
from dast.training.levers import Levers, choose_levers, compile_segmentor, to_channels_last
from dast.training.online.recipe import TeacherHook, online_parts
from dast.training.plans import StagePlan, stage_plans
from dast.training.runtime import Runtime
from dast.training.step import Batch


@dataclass(frozen=True)
class Mode:
    """Requested speed settings (``None`` for channels_last: on CUDA only)."""

    amp: Literal["none", "bf16"]
    channels_last: bool | None
    reuse_discoverer: bool
    optimizers: Literal["released", "foreach"]  # see dast.training.optim
    cuda_graph: bool
    compile: bool
    about: str


MODES: dict[str, Mode] = {
    "eager-fp32": Mode(
        "none",
        False,
        False,
        "released",
        False,
        False,
        "the released code's way: fp32 (TF32 convolutions on CUDA), D three times, released SGD",
    ),
    "eager-bf16": Mode("bf16", False, False, "released", False, False, "eager-fp32 under bf16 autocast"),
    "fast-nograph": Mode(
        "bf16", None, True, "foreach", False, False, "bf16, channels_last (CUDA), D once, foreach optimisers; eager"
    ),
    "fast": Mode(
        "bf16", None, True, "foreach", True, False, "fast-nograph plus the whole step as CUDA graphs (CUDA only)"
    ),
    "fast-compile": Mode(
        "bf16", None, True, "foreach", False, True, "fast-nograph plus torch.compile of the segmentor halves"
    ),
    "fast-fp32": Mode(
        "none",
        None,
        True,
        "foreach",
        True,
        False,
        "the fast mode without bf16: fp32 (TF32 convolutions on CUDA), channels_last (CUDA), "
        "D once, foreach optimisers, CUDA graphs (CUDA)",
    ),
}


@dataclass(frozen=True)
class ResolvedMode:
    """What a mode runs on one device: the levers :func:`choose_levers` gives its request."""

    name: str
    levers: Levers
    reuse_discoverer: bool

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.levers.amp_dtype

    @property
    def channels_last(self) -> bool:
        return self.levers.channels_last

    @property
    def cuda_graph(self) -> bool:
        return self.levers.cuda_graphs

    @property
    def compile(self) -> bool:
        return self.levers.compile

    def describe(self) -> dict[str, Any]:
        """JSON-able fields: the levers, why each is on or off, and the D(f_t) reuse."""
        d = self.levers.describe()
        d["reuse_discoverer"] = self.reuse_discoverer
        return d

    def autocast(self, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
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


def runtime_request(mode: Mode) -> RuntimeConfig:
    """The ``runtime`` section of a config that asks for ``mode``'s levers."""
    return RuntimeConfig(
        amp=mode.amp,
        channels_last=mode.channels_last,
        cuda_graphs=mode.cuda_graph,
        compile=mode.compile,
        optimizers=mode.optimizers,
    )


def resolve_mode(name: str, device: torch.device) -> ResolvedMode:
    """The levers of mode ``name`` on ``device`` (each falls back where the device would be slower)."""
    m = MODES[name]
    return ResolvedMode(name, choose_levers(runtime_request(m), device), m.reuse_discoverer)


# ---------------------------------------------------------------------------------------
# Training setups


def build_nets(arch: str, num_classes: int, variant: str, seed: int) -> tuple[Segmentor, Discoverer, Corrector]:
    """(segmentor, discoverer, corrector) with random weights from ``seed``."""
    torch.manual_seed(seed)
    seg = build_segmentor(arch, num_classes, variant)
    return seg, build_discoverer(seg.feature_channels), build_corrector(num_classes)


def bench_config(
    mode: ResolvedMode, variant: str, num_classes: int, arch: str = "small", overrides: dict[str, Any] | None = None
) -> Config:
    """The resolved config whose stages ``dast train`` would build exactly as the benchmark
    does: the config's defaults (the paper's optimiser settings; ``reference``: the released
    ones), one self-training round, the mode's levers and ``overrides`` (a config tree, e.g.
    ``{"train": {"lr": 0.01}}``). ``arch`` only steers the variant's defaults (released VGG-16)."""
    levers = mode.levers
    amp = amp_name(levers.amp_dtype)
    tree: dict[str, Any] = {
        "variant": variant,
        "model": {"arch": arch if arch in ("resnet101", "vgg16", "small") else "small", "num_classes": num_classes},
        "source": {"kind": "synthetic"},
        "target": {"kind": "synthetic", "domain": "target"},
        "train": {"reuse_discoverer": mode.reuse_discoverer},
        "self_training": {"rounds": 1},
        "runtime": {
            "amp": amp,
            "channels_last": levers.channels_last,
            "cuda_graphs": levers.cuda_graphs,
            "compile": levers.compile,
            "optimizers": levers.optimizers,
        },
    }
    return resolve(from_tree(deep_merge(tree, overrides or {}), "bench"))


ONLINE_STAGE = 3  # TrainingSetup's stage number of the online stage (self_training.mode: online)


def bench_plan(cfg: Config, stage: int = 1) -> StagePlan:
    """The plan of a benchmarked iteration: stage 1, or (``stage`` 2) the first round with
    pseudo labels, or (3, with ``self_training.mode: online``) the online stage; the plans
    ``dast train`` makes of ``cfg``."""
    return stage_plans(cfg, 1)[0 if stage == 1 else 1]


class TrainingSetup:
    """Networks and the :class:`~dast.training.engine.Engine` of one mode, ready to iterate.

    ``step(i, xs, ys, xt, yt)`` runs iteration ``i`` through ``Engine.step`` (poly learning
    rates, then the eager or graph-replayed step), exactly as ``dast train`` does for the
    config :func:`bench_config` writes (``stage`` 1, or 2: the first self-training round,
    or 3: the online stage;
    ``arch`` names the networks' architecture for the variant's defaults; ``overrides``: a
    config tree). The networks are moved to ``device`` and converted to channels_last /
    compiled as the mode says.
    """

    def __init__(
        self,
        mode: ResolvedMode,
        nets: tuple[Segmentor, Discoverer, Corrector],
        device: torch.device,
        *,
        stage: int = 1,
        overrides: dict[str, Any] | None = None,
        graph_warmup: int = 3,
        variant: str = "reference",
        arch: str = "small",
    ) -> None:
        seg, disc, corr = nets[0].to(device), nets[1].to(device), nets[2].to(device)
        for m in (seg, disc, corr):
            m.train()
        if mode.channels_last:
            to_channels_last(seg, disc, corr)
        if mode.compile:
            compile_segmentor(seg)
        self.mode, self.device = mode, device
        self.segmentor, self.discoverer, self.corrector = seg, disc, corr
        num_classes = int(getattr(seg, "num_classes", 19))
        online = {"self_training": {"mode": "online"}} if stage == ONLINE_STAGE else {}
        self.config = bench_config(mode, variant, num_classes, arch, deep_merge(overrides or {}, online))
        networks = Networks(ModelSpec(arch="small", num_classes=num_classes, variant=variant), seg, disc, corr)
        runtime = Runtime(device, mode.levers, deterministic=False)
        plan = bench_plan(self.config, stage)
        self.teacher: TeacherHook | None = None
        recipe = None
        if stage == ONLINE_STAGE:  # the teacher, its targets and the mixed image's loss are part of the step
            recipe, self.teacher = online_parts(self.config, networks, runtime.autocast, rank=0)
        self.engine = Engine.build(plan, self.config, networks, runtime, graph_warmup=graph_warmup, extra=recipe)

    @property
    def graphed(self) -> GraphedStep | None:
        update = self.engine.update
        return update.graphed if isinstance(update, GraphedUpdate) else None

    @property
    def seg_opt(self) -> torch.optim.Optimizer:
        return self.engine.seg_opt

    @property
    def disc_opt(self) -> torch.optim.Optimizer | None:
        return self.engine.disc_opt

    def prepare_images(self, x: Tensor) -> Tensor:
        """Images on the device, channels_last when the mode uses it."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.mode.channels_last else x

    def step(self, i: int, xs: Tensor, ys: Tensor, xt: Tensor, yt: Tensor | None) -> tuple[dict[str, Tensor], bool]:
        """Iteration ``i`` (the online stage: with its draws and the teacher's EMA after it)."""
        if self.teacher is not None:
            self.teacher.recipe.begin(i)
        result = self.engine.step(i, Batch(xs, ys, xt, yt))
        if self.teacher is not None and result.applied:
            self.teacher.recipe.teacher.update(self.teacher.student, i + 1)
        return result.scalars, result.applied
