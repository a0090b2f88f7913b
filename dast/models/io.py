"""Save and load networks as dast checkpoints (see :mod:`dast.checkpoint`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dast.checkpoint import load_checkpoint, save_checkpoint
from dast.errors import CheckpointError
from dast.models.build import ARCHS, VARIANTS, build_corrector, build_discoverer, build_segmentor
from dast.models.discriminators import Corrector, Discoverer
from dast.models.segmentor import Segmentor
from dast.models.target_model import TargetModel
from dast.palette import as_color


@dataclass
class ModelSpec:
    """Everything needed to rebuild the networks and prepare their input."""

    arch: str
    num_classes: int
    variant: str = "paper"
    norm: str = "caffe"
    input_size: tuple[int, int] | None = None  # (width, height) target images are resized to
    discoverer: bool = True
    corrector: bool = True
    attention: bool = True
    corrector_width: int = 64
    timm_name: str | None = None  # arch "timm": the timm model the encoder is cut from
    output_stride: int | None = None  # None: the architecture's default (8)
    class_names: list[str] = field(default_factory=list)
    class_colors: list[tuple[int, int, int]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        spec = cls(**known)
        if spec.input_size is not None:
            spec.input_size = (int(spec.input_size[0]), int(spec.input_size[1]))
        spec.class_colors = [as_color(c) for c in spec.class_colors]
        return spec

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size) if self.input_size else None
        d["class_colors"] = [list(c) for c in self.class_colors]
        return d


@dataclass
class Networks:
    """The segmentor and the (optional) discriminators of one model."""

    spec: ModelSpec
    segmentor: Segmentor
    discoverer: Discoverer | None
    corrector: Corrector | None

    def target_model(self) -> TargetModel:
        """The deployable target-domain model (attention only when the spec uses it)."""
        return TargetModel(self.segmentor, self.discoverer if self.spec.attention else None)

    def to(self, device: torch.device | str) -> Networks:
        for m in self.modules():
            m.to(device)
        return self

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.segmentor, self.discoverer, self.corrector) if m is not None]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix, m in (
            ("segmentor", self.segmentor),
            ("discoverer", self.discoverer),
            ("corrector", self.corrector),
        ):
            if m is not None:
                for k, v in m.state_dict().items():
                    out[f"{prefix}.{k}"] = v
        return out


def build_networks(spec: ModelSpec, pretrained: bool = False) -> Networks:
    """Build freshly initialised networks for ``spec`` (``pretrained``: timm's own
    weights for a timm encoder; no other architecture has them)."""
    if spec.arch not in ARCHS:
        raise CheckpointError(f"unknown architecture {spec.arch!r} (known: {', '.join(ARCHS)})")
    if spec.variant not in VARIANTS:
        raise CheckpointError(f"unknown variant {spec.variant!r} (known: {', '.join(VARIANTS)})")
    if spec.arch == "timm" and (not spec.timm_name or spec.variant != "paper"):
        raise CheckpointError(
            f"a timm model needs a timm name and variant 'paper' (got {spec.timm_name!r}, {spec.variant!r})"
        )
    try:
        seg = build_segmentor(
            spec.arch,
            spec.num_classes,
            spec.variant,
            timm_name=spec.timm_name,
            output_stride=spec.output_stride,
            pretrained=pretrained,
        )
    except ValueError as exc:  # e.g. an output stride the architecture does not support
        raise CheckpointError(str(exc)) from None
    disc = build_discoverer(seg.feature_channels) if spec.discoverer else None
    corr = build_corrector(spec.num_classes, spec.corrector_width) if spec.corrector else None
    return Networks(spec, seg, disc, corr)


def split_prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.``, with the prefix removed."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    """Load ``state`` into ``module``; a missing, unexpected or misshapen key is a CheckpointError."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source}: the {what} weights do not fit this architecture: {', '.join(parts)}")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: {what} weight '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )
    module.load_state_dict(dict(state), strict=True)


def save_networks(
    path: str | Path,
    nets: Networks,
    extra_meta: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write a model checkpoint (or, with extras, a full training checkpoint)."""
    meta: dict[str, Any] = {"kind": "model", "model": nets.spec.to_dict()}
    if extra_meta:
        meta.update(extra_meta)
    tensors = nets.state_tensors()
    if extra_tensors:
        tensors.update(extra_tensors)
    save_checkpoint(path, tensors, meta)


def load_networks(
    path: str | Path, device: str | torch.device = "cpu", expect: Mapping[str, Any] | None = None
) -> tuple[Networks, dict[str, torch.Tensor], dict[str, Any]]:
    """Rebuild the networks stored in a dast checkpoint.

    ``expect`` may name ``arch`` and ``num_classes`` that the checkpoint must match.
    Returns (networks, all tensors, JSON document).
    """
    tensors, meta = load_checkpoint(path, device="cpu")
    if "model" not in meta:
        raise CheckpointError(f"checkpoint {path} holds no model description")
    spec = ModelSpec.from_dict(meta["model"])
    for key, want in (expect or {}).items():
        have = getattr(spec, key)
        if want is not None and have != want:
            raise CheckpointError(f"checkpoint {path} is for {key}={have!r}, but {key}={want!r} was requested")
    nets = build_networks(spec)
    assign_weights(nets, tensors, str(path))
    nets.to(device)
    return nets, tensors, meta


def assign_weights(nets: Networks, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load the stored weights of every network present in ``nets`` (strict per network)."""
    load_state_strict(nets.segmentor, split_prefixed(tensors, "segmentor"), "segmentor", source)
    for name, m in (("discoverer", nets.discoverer), ("corrector", nets.corrector)):
        if m is not None:
            load_state_strict(m, split_prefixed(tensors, name), name, source)
