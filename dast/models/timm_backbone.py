"""Any timm backbone as the encoder E of the segmentor (``model.arch: timm``).

The segmentor built here is S = P o E with

* E: ``timm.create_model(name, features_only=True, out_indices=(-1,))``, the backbone
  up to its deepest feature map. The discoverer sizes itself from that map's channel
  count and the attention acts on it;
* no tail (``nn.Identity``): the attention point is E's output;
* P: the ASPP-v2 classifier of DeepLab-v2 with the paper's rates (6, 12, 18, 24) scaled
  by 8 / output stride, for every family (CNN or transformer), so the 10x learning-rate
  head means the same thing as for the DeepLab backbones.

Output stride: ``None`` asks for 8 (DeepLab-v2's) where the family can dilate (ResNet,
EfficientNet, MobileNet, ConvNeXt, RegNet, NFNet, ByobNet ...) and otherwise keeps the
family's native stride (ViT: its patch size). An explicit value that the family cannot
deliver is a :class:`~dast.errors.ConfigError`. Models that accept ``dynamic_img_size``
(ViTs) get it, so they run at any input size.

timm is optional and heavy (it imports torchvision), so it is imported only when such
a model is built; without it the error says how to install it.
"""

from __future__ import annotations

import difflib
from importlib import metadata
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from dast.errors import ConfigError, UserError
from dast.models.aspp import ASPPClassifier
from dast.models.segmentor import Encoder, Segmentor

DEFAULT_STRIDE = 8
PAPER_RATES = (6, 12, 18, 24)
DOCS = "docs/backbones.md"


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision release built for a torch release (``2.13.0+cpu`` -> ``0.28``): the
    minor versions of torch 2.x and torchvision 0.x go in step, 15 apart. None for other torches."""
    parts = torch_version.split("+")[0].split(".")
    if len(parts) < 2 or parts[0] != "2" or not parts[1].isdigit():
        return None
    return f"0.{int(parts[1]) + 15}"


def install_hint(torch_version: str) -> str:
    """The commands that install timm next to the installed torch without replacing it: the
    matching torchvision first (from PyTorch's own index for a ``+cpu``/``+cuXXX`` build), then
    timm. (Not ``pip install dast[timm]``: on the public index, ``dast`` is another project.)"""
    vision = matching_torchvision(torch_version)
    if vision is None:
        return f"install the torchvision built for torch {torch_version}, then pip install timm ({DOCS})"
    build = torch_version.partition("+")[2]
    index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
    return f"pip install 'torchvision=={vision}.*'{index} && pip install timm ({DOCS})"


def import_timm() -> ModuleType:
    """The timm module, or a ConfigError with the commands that install it for this torch."""
    hint = install_hint(torch.__version__)
    try:
        import timm  # noqa: PLC0415 - optional: timm, imported only for model.arch: timm
    except ImportError:
        raise ConfigError(f"a timm backbone (model.arch: timm) needs the timm package: {hint}") from None
    except (OSError, RuntimeError) as exc:  # e.g. a torchvision built for another torch
        try:
            vision = f"torchvision {metadata.version('torchvision')}"
        except metadata.PackageNotFoundError:
            vision = "torchvision"
        raise ConfigError(
            f"a timm backbone (model.arch: timm) needs timm, which is installed but fails to import "
            f"({_first_sentence(exc)}): {vision} does not fit torch {torch.__version__}; {hint}"
        ) from None
    return timm


def _first_sentence(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """The paper's ASPP rates for output stride 8, scaled to ``output_stride`` (at least 1)."""
    return tuple(max(1, r * DEFAULT_STRIDE // output_stride) for r in PAPER_RATES)


class TimmEncoder(Encoder):
    """E: a timm feature extractor returning only its deepest feature map (N x C x h x w).

    ``body`` is timm's features-only network; its state-dict keys sit under ``body.``.
    """

    def __init__(self, body: nn.Module, timm_name: str, timm_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.body = body
        self.timm_name = timm_name
        self.timm_kwargs = dict(timm_kwargs)
        info: Any = body.feature_info  # timm's FeatureInfo
        self.out_channels = int(info.channels()[-1])
        self.output_stride = int(info.reduction()[-1])
        fmt = getattr(body, "output_fmt", "NCHW")
        self.channels_last_output = str(getattr(fmt, "value", fmt)) == "NHWC"

    def stages(self) -> list[nn.Module]:
        """The top-level modules of the feature extractor, in order."""
        return list(self.body.children())

    def forward(self, x: Tensor) -> Tensor:
        f = self.body(x)[-1]
        return f.permute(0, 3, 1, 2) if self.channels_last_output else f


def _unknown_model(timm: ModuleType, name: str) -> ConfigError:
    names = timm.list_models()
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f" (did you mean '{match[0]}'?)" if match else " (see timm.list_models())"
    return ConfigError(f"model.timm_name {name!r} is not a timm model{hint}")


def _create_body(
    timm: ModuleType, name: str, pretrained: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` features-only, with ``dynamic_img_size`` where the family takes it.
    Returns the network and the keyword arguments it was built with."""
    dynamic = {**kwargs, "dynamic_img_size": True}
    try:
        return timm.create_model(name, features_only=True, out_indices=(-1,), pretrained=pretrained, **dynamic), dynamic
    except TypeError as exc:
        if "dynamic_img_size" not in str(exc):
            raise
    return timm.create_model(name, features_only=True, out_indices=(-1,), pretrained=pretrained, **kwargs), dict(kwargs)


def _create_or_explain(
    timm: ModuleType, name: str, pretrained: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    try:
        return _create_body(timm, name, pretrained, kwargs)
    except RuntimeError as exc:
        text = str(exc).lower()
        if "pretrained tag" in text:  # a name such as resnet50.bogus_tag
            raise ConfigError(f"model.timm_name {name!r}: {_first_sentence(exc)}") from None
        if pretrained and "pretrained" in text:
            raise ConfigError(
                f"model.pretrained: timm has no pretrained weights for {name!r}; set model.pretrained: "
                "false or convert a weight file with `dast convert imagenet --arch timm`"
            ) from None
        raise
    except OSError as exc:
        if not pretrained:
            raise
        raise UserError(
            f"model.pretrained: could not fetch timm's weights for {name!r} ({_first_sentence(exc)}); "
            "this needs network access to the Hugging Face hub, or convert a local file with "
            "`dast convert imagenet --arch timm`"
        ) from None


def create_timm_encoder(name: str, output_stride: int | None = None, pretrained: bool = False) -> TimmEncoder:
    """E for timm model ``name`` (see the module doc for the output-stride rule).

    ``pretrained`` loads timm's own weights (network access, or timm's local cache).
    """
    timm = import_timm()
    if not timm.is_model(name):
        raise _unknown_model(timm, name)
    wanted = DEFAULT_STRIDE if output_stride is None else int(output_stride)
    try:
        body, used = _create_or_explain(timm, name, pretrained, {"output_stride": wanted})
    except (TypeError, AssertionError, ValueError) as exc:
        try:  # does the family build at all without output_stride?
            body, used = _create_or_explain(timm, name, pretrained, {})
        except (TypeError, AssertionError, ValueError):
            raise exc from None
    encoder = TimmEncoder(body, name, used)
    if output_stride is not None and encoder.output_stride != output_stride:
        works = ", ".join(str(s) for s in _strides_that_build(timm, name, encoder.output_stride))
        raise ConfigError(
            f"timm model {name!r} cannot run at output stride {output_stride}; it runs at {works} "
            f"(model.output_stride: null picks {DEFAULT_STRIDE} where the family dilates, else its native "
            f"{encoder.output_stride})"
        )
    return encoder


def _strides_that_build(timm: ModuleType, name: str, native: int) -> list[int]:
    """The output strides among 8, 16, 32 that timm builds ``name`` at (random weights), for
    an error message; the native stride always works."""
    works = {native}
    for stride in (8, 16, 32):
        if stride < native:
            try:
                body, used = _create_body(timm, name, False, {"output_stride": stride})
            except (TypeError, AssertionError, ValueError, RuntimeError):
                continue
            if TimmEncoder(body, name, used).output_stride == stride:
                works.add(stride)
    return sorted(works)


def build_timm_segmentor(
    name: str, num_classes: int, output_stride: int | None = None, pretrained: bool = False
) -> Segmentor:
    """S = P o E: a timm encoder, no tail, and an ASPP-v2 classifier (random init)."""
    encoder = create_timm_encoder(name, output_stride, pretrained)
    classifier = ASPPClassifier(encoder.out_channels, num_classes, aspp_rates(encoder.output_stride))
    return Segmentor(encoder, nn.Identity(), classifier, num_classes)


def encoder_key(full_key: str, feature_keys: set[str] | frozenset[str]) -> str | None:
    """Where a key of the whole timm model (or of a torchvision model with timm's layout)
    lives in the features-only network, or None when it lies past the deepest feature map.

    timm's feature wrappers keep a module's name, flatten one level of ``nn.Sequential``
    (``stages.0.x`` -> ``stages_0.x``), or hold the model as ``model`` (ViTs).
    """
    if full_key in feature_keys:
        return full_key
    for candidate in ("model." + full_key, full_key.replace(".", "_", 1)):
        if candidate in feature_keys:
            return candidate
    return None


def full_model_keys(encoder: TimmEncoder) -> set[str]:
    """State-dict keys of the whole timm model that ``encoder`` was cut from (classifier
    included), built with the same arguments and random weights."""
    timm = import_timm()
    model = timm.create_model(encoder.timm_name, pretrained=False, **encoder.timm_kwargs)
    return set(model.state_dict())
