"""Load the authors' released weights and ImageNet initialisations into dast networks.

Three key layouts meet here:

* **released** (``official``): the state dicts that the authors' code saves.
  ResNet-101 segmentor: ``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``layer5.0`` (the
  split-off last block) and ``layer6`` (the classifier). VGG-16 segmentor: ``layer1`` ..
  ``layer3`` (conv1_1 .. conv5_3), ``layer4`` (fc6, fc7) and ``classifier``. The two
  discriminators are saved as one ``ModuleList``: ``0.*`` is D, ``1.*`` is C.
* **ImageNet initialisations**: the DeepLab file ``DeepLab_resnet_pretrained_init-*.pth``
  (every key carries a one-word prefix such as ``Scale.``; ``layer4`` still has its 3rd
  block and an old classifier sits under ``layer5``), or torchvision's ``resnet101`` /
  ``vgg16`` state dicts.
* **dast**: ``encoder.*``, ``tail.*``, ``classifier.*`` inside the segmentor, and
  ``discoverer.*`` / ``corrector.*`` beside it.

Every conversion returns a :class:`ConversionReport` naming what was loaded, what the
file lacked, what it had in excess and what was dropped on purpose. A tensor whose shape
does not fit is a :class:`~dast.errors.CheckpointError` naming both shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dast.data.labels import cityscapes_table
from dast.errors import CheckpointError
from dast.models.io import ModelSpec, Networks, build_networks
from dast.models.resnet import ResNetEncoder
from dast.models.timm_backbone import TimmEncoder, encoder_key, full_model_keys
from dast.models.vgg import torchvision_feature_index_map

CONVERT_ARCHS = ("resnet101", "vgg16", "small")
IMAGENET_ARCHS = CONVERT_ARCHS + ("timm",)  # `dast convert imagenet` also takes timm backbones
FORMATS = ("auto", "deeplab", "torchvision", "dast")
RELEASED_INPUT_SIZE = (1024, 512)  # (width, height) of the released target images
_RESNET_STEM = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
_BN_COUNTER = "num_batches_tracked"


@dataclass
class ConversionReport:
    """What a conversion did, key by key.

    * ``loaded``: dast keys (``segmentor.encoder.conv1.weight`` ...) that received a value
      from the file;
    * ``missing``: dast keys the file did not provide; they keep their fresh
      initialisation (for an ImageNet file only the backbone is listed: the classifier
      and the discriminators are always fresh);
    * ``unexpected``: file keys that fit nothing in the dast networks;
    * ``skipped``: file keys dropped on purpose (an old classifier, torchvision's ``fc``);
    * ``filled``: BatchNorm ``num_batches_tracked`` counters absent from an old file,
      set to 0.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    source_format: str = ""

    def counts(self) -> dict[str, int]:
        """Number of keys in each list."""
        return {
            "loaded": len(self.loaded),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "skipped": len(self.skipped),
            "filled": len(self.filled),
        }

    def summary(self, max_keys: int = 8) -> str:
        """A human-readable account: the counts, then the keys of every non-empty list
        except ``loaded`` (at most ``max_keys`` each, the rest counted)."""
        c = self.counts()
        head = ", ".join(f"{v} {k}" for k, v in c.items())
        lines = [f"format: {self.source_format}" if self.source_format else "", head]
        notes = {
            "missing": "not in the file, left at their fresh initialisation",
            "unexpected": "in the file, but fit nothing",
            "skipped": "in the file, dropped on purpose",
            "filled": "BatchNorm counters absent from the file, set to 0",
        }
        for name, note in notes.items():
            keys: list[str] = getattr(self, name)
            if not keys:
                continue
            if name == "filled":  # one per BatchNorm layer: a count says enough
                lines.append(f"{name} ({note}): {len(keys)} key{'s' if len(keys) > 1 else ''}, e.g. {keys[0]}")
                continue
            lines.append(f"{name} ({note}):")
            lines.extend(f"  {k}" for k in _abbreviate(keys, max_keys))
        return "\n".join(line for line in lines if line)

    def to_dict(self) -> dict[str, object]:
        """Counts and the short lists, for a checkpoint's JSON document."""
        return {
            "format": self.source_format,
            "counts": self.counts(),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "skipped": list(self.skipped),
        }


def _abbreviate(keys: Sequence[str], max_keys: int) -> list[str]:
    """At most ``max_keys`` lines; runs of keys under one module are folded first."""
    if len(keys) <= max_keys:
        return list(keys)
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.rsplit(".", 1)[0], []).append(k)
    folded = [f"{m}.* ({len(ks)} keys)" if len(ks) > 1 else ks[0] for m, ks in groups.items()]
    if len(folded) <= max_keys:
        return folded
    return folded[: max_keys - 1] + [f"... and {len(folded) - max_keys + 1} more ({len(keys)} keys in all)"]


# ---------------------------------------------------------------------------
# released <-> dast key names


def _official_prefixes(arch: str) -> list[tuple[str, str]]:
    """(released prefix, dast segmentor prefix) pairs for ``arch``."""
    if arch == "vgg16":
        return [
            ("layer1.", "encoder.layer1."),
            ("layer2.", "encoder.layer2."),
            ("layer3.", "encoder.layer3."),
            ("layer4.", "tail."),
            ("classifier.", "classifier."),
        ]
    return [(f"{s}.", f"encoder.{s}.") for s in _RESNET_STEM] + [("layer5.", "tail."), ("layer6.", "classifier.")]


def _rename(key: str, pairs: Iterable[tuple[str, str]]) -> str | None:
    for a, b in pairs:
        if key.startswith(a):
            return b + key[len(a) :]
    return None


def official_segmentor_key(key: str, arch: str) -> str | None:
    """The dast segmentor key for a released segmentor key (None if it fits no stage)."""
    _check_arch(arch)
    return _rename(key, _official_prefixes(arch))


def dast_segmentor_key(key: str, arch: str) -> str:
    """The released segmentor key for a dast segmentor key."""
    _check_arch(arch)
    out = _rename(key, [(b, a) for a, b in _official_prefixes(arch)])
    if out is None:
        raise CheckpointError(f"dast segmentor key {key!r} has no place in the released {arch} layout")
    return out


_DISC_PREFIXES = (("0.", "discoverer."), ("1.", "corrector."))


def _check_arch(arch: str) -> None:
    if arch not in CONVERT_ARCHS:
        raise CheckpointError(f"unknown architecture {arch!r} (known: {', '.join(CONVERT_ARCHS)})")


# ---------------------------------------------------------------------------
# loading mapped tensors into networks


def _strip_common_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def _load_mapped(
    nets: Networks,
    mapped: Sequence[tuple[str, str | None, Tensor]],
    report: ConversionReport,
    source: str,
) -> set[str]:
    """Copy ``(file key, dast key or None, tensor)`` triples into ``nets``.

    A None or unknown dast key goes to ``report.unexpected``. Shapes are checked before
    anything is written. Returns the set of dast keys that were written.
    """
    own = nets.state_tensors()
    plan: list[tuple[str, str, Tensor]] = []
    for src, dst, t in mapped:
        if dst is None or dst not in own:
            report.unexpected.append(src)
            continue
        if tuple(own[dst].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{source}: '{src}' has shape {tuple(t.shape)}, but dast '{dst}' expects {tuple(own[dst].shape)}"
            )
        plan.append((src, dst, t))
    written: set[str] = set()
    with torch.no_grad():
        for _, dst, t in plan:
            own[dst].copy_(t.to(own[dst].dtype))
            written.add(dst)
    report.loaded.extend(k for k in own if k in written)
    return written


def _account_missing(nets: Networks, written: set[str], report: ConversionReport, scope: Sequence[str]) -> None:
    """List the keys under the ``scope`` prefixes that received nothing; fill BN counters."""
    own = nets.state_tensors()
    with torch.no_grad():
        for k, v in own.items():
            if k in written or not any(k.startswith(p) for p in scope):
                continue
            if k.endswith("." + _BN_COUNTER):
                v.zero_()
                report.filled.append(k)
            else:
                report.missing.append(k)


def _raise_if(
    report: ConversionReport,
    source: str,
    *,
    missing: Sequence[str],
    allow_missing: bool,
    allow_unexpected: bool,
    unexpected_hint: str = "",
) -> None:
    if report.unexpected and not allow_unexpected:
        n = len(report.unexpected)
        hint = f" {unexpected_hint}" if unexpected_hint else ""
        raise CheckpointError(
            f"{source}: {n} unexpected key{'s' if n > 1 else ''} (e.g. '{report.unexpected[0]}');{hint}"
            " pass --allow-unexpected (allow_unexpected=True) to ignore them"
        )
    if missing and not allow_missing:
        n = len(missing)
        raise CheckpointError(
            f"{source}: lacks {n} tensor{'s' if n > 1 else ''} the network needs (e.g. '{missing[0]}');"
            " pass --allow-missing (allow_missing=True) to keep them freshly initialised"
        )


def _class_table(num_classes: int) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Cityscapes names and colours for 19 classes (the released models' label set)."""
    if num_classes != 19:
        return [], []

    table = cityscapes_table()
    return list(table.names), list(table.colors)


# ---------------------------------------------------------------------------
# released checkpoints


def _official_kind(keys: Iterable[str]) -> str | None:
    ks = list(keys)
    tops = {k.split(".", 1)[0] for k in ks}
    if tops & {"segmentor", "encoder", "tail"}:
        return "dast"
    if "layer6" in tops and "conv1" in tops:
        return "resnet"
    if "classifier" in tops and "layer4" in tops and "conv1" not in tops:
        return "vgg16"
    if tops and tops <= {"0", "1"}:
        return "discriminators"
    return None


def official_to_dast(
    segmentor_sd: Mapping[str, Tensor],
    discriminators_sd: Mapping[str, Tensor] | None,
    arch: str,
    num_classes: int,
    *,
    variant: str = "reference",
    allow_unexpected: bool = False,
    allow_missing: bool = False,
    source: str = "released checkpoint",
) -> tuple[Networks, ConversionReport]:
    """Build dast networks holding the released segmentor (and discriminators).

    The spec is the released model: ``variant="reference"`` (two ASPP branches, the
    fresh shortcut in ``layer5``), caffe normalisation, 1024x512 inputs. D and C exist
    (and attention is on) only when ``discriminators_sd`` is given. A ``module.``
    prefix (DataParallel) is dropped. Unexpected or missing keys raise unless allowed.
    """
    _check_arch(arch)
    seg_sd = _strip_common_prefix(segmentor_sd, "module.")
    kind = _official_kind(seg_sd)
    want = "vgg16" if arch == "vgg16" else "resnet"
    if kind == "dast":
        raise CheckpointError(f"{source}: this is already in dast's layout; load it with `dast predict --checkpoint`")
    if kind == "discriminators":
        raise CheckpointError(
            f"{source}: holds discriminators ('0.*', '1.*'), not a segmentor; pass it as --discriminators"
        )
    if kind is None:
        example = next(iter(seg_sd), "<empty>")
        raise CheckpointError(
            f"{source}: not a released DAST segmentor (expected keys like 'conv1.weight' and"
            f" 'layer6.conv2d_list.0.weight' or 'classifier.conv2d_list.0.weight'; found e.g. '{example}')"
        )
    if kind != want:
        raise CheckpointError(
            f"{source}: holds a {'VGG-16' if kind == 'vgg16' else 'ResNet'} segmentor, but arch {arch!r} was requested"
        )
    with_d = discriminators_sd is not None
    names, colors = _class_table(num_classes)
    spec = ModelSpec(
        arch=arch,
        num_classes=num_classes,
        variant=variant,
        norm="caffe",
        input_size=RELEASED_INPUT_SIZE,
        discoverer=with_d,
        corrector=with_d,
        attention=with_d,
        class_names=names,
        class_colors=colors,
    )
    nets = build_networks(spec)
    report = ConversionReport(source_format="released")
    mapped: list[tuple[str, str | None, Tensor]] = []
    for k, v in seg_sd.items():
        dst = official_segmentor_key(k, arch)
        mapped.append((k, None if dst is None else "segmentor." + dst, v))
    if discriminators_sd is not None:
        d_sd = _strip_common_prefix(discriminators_sd, "module.")
        if _official_kind(d_sd) != "discriminators":
            example = next(iter(d_sd), "<empty>")
            raise CheckpointError(
                f"{source}: the discriminators file is not the released ModuleList (expected '0.conv1.weight',"
                f" '1.conv1.weight', ...; found e.g. '{example}')"
            )
        for k, v in d_sd.items():
            mapped.append((k, _rename(k, _DISC_PREFIXES), v))
    written = _load_mapped(nets, mapped, report, source)
    _account_missing(nets, written, report, ("segmentor.", "discoverer.", "corrector."))
    _raise_if(report, source, missing=report.missing, allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    return nets, report


def dast_to_official(nets: Networks) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """The inverse of :func:`official_to_dast`: (segmentor state dict, discriminators
    state dict or None) in the released key layout. Tensors are detached copies."""
    arch = nets.spec.arch
    seg = {dast_segmentor_key(k, arch): v.detach().clone() for k, v in nets.segmentor.state_dict().items()}
    disc: dict[str, Tensor] = {}
    for idx, m in (("0", nets.discoverer), ("1", nets.corrector)):
        if m is not None:
            disc.update({f"{idx}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
    return seg, (disc or None)


# ---------------------------------------------------------------------------
# ImageNet initialisations


def detect_imagenet_format(keys: Iterable[str], arch: str) -> tuple[str, str]:
    """Return (format, prefix) of an ImageNet weight file for ``arch``.

    Formats: ``deeplab`` (every key under one extra word such as ``Scale.``),
    ``torchvision`` and ``dast``. Anything else is a CheckpointError.
    """
    ks = list(keys)
    tops = {k.split(".", 1)[0] for k in ks}
    if tops & {"segmentor", "encoder", "tail"}:
        return "dast", "segmentor." if "segmentor" in tops else ""
    if arch == "vgg16":
        if "features" in tops and tops <= {"features", "classifier"}:
            return "torchvision", ""
    else:
        if "layer6" in tops:
            raise CheckpointError(
                "this is a released DAST segmentor, not an ImageNet initialisation; use `dast convert official`"
            )
        if "conv1" in tops and tops <= set(_RESNET_STEM) | {"fc"}:
            return "torchvision", ""
        if len(tops) == 1 and all("." in k for k in ks):
            prefix = next(iter(tops)) + "."
            inner = {k[len(prefix) :].split(".", 1)[0] for k in ks}
            if "conv1" in inner and inner <= set(_RESNET_STEM) | {"layer5"}:
                return "deeplab", prefix
    example = ks[0] if ks else "<empty>"
    expected = (
        "torchvision VGG-16 keys like 'features.0.weight'"
        if arch == "vgg16"
        else "DeepLab init keys like 'Scale.conv1.weight' "
        "or torchvision keys like 'conv1.weight', 'layer4.2.conv3.weight'"
    )
    raise CheckpointError(
        f"unrecognised weight file for {arch}: expected {expected} or dast keys 'encoder.*'; found e.g. '{example}'"
    )


def _resnet_imagenet_key(key: str, n_enc_blocks: int) -> str | None:
    """Released/torchvision ResNet key -> dast segmentor key (``layer4.<last>`` -> ``tail.0``)."""
    top = key.split(".", 1)[0]
    if top in ("conv1", "bn1", "layer1", "layer2", "layer3"):
        return "encoder." + key
    if top == "layer4":
        parts = key.split(".")
        if len(parts) < 3 or not parts[1].isdigit():
            return None
        block = int(parts[1])
        if block < n_enc_blocks:
            return "encoder." + key
        if block == n_enc_blocks:
            return "tail.0." + ".".join(parts[2:])
    return None


def _vgg_torchvision_key(key: str) -> str | None:
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "features" or not parts[1].isdigit():
        return None
    where = torchvision_feature_index_map().get(int(parts[1]))
    if where is None:
        return None
    layer, idx = where
    return f"encoder.layer{layer}.{idx}.{parts[2]}"


@dataclass(frozen=True, kw_only=True)
class ImportOptions:
    """How :func:`imagenet_to_dast` reads a weight file: its format (``auto``, ``deeplab``,
    ``torchvision``), the input normalisation to record (None: the format's), whether
    unexpected or missing keys are tolerated, and the name errors give the file."""

    fmt: str = "auto"
    norm: str | None = None
    allow_unexpected: bool = False
    allow_missing: bool = False
    source: str = "weight file"


def imagenet_to_dast(
    weights_sd: Mapping[str, Tensor],
    arch: str,
    num_classes: int,
    variant: str = "paper",
    options: ImportOptions | None = None,
) -> tuple[Networks, ConversionReport]:
    """Build fresh dast networks (segmentor, D, C) whose backbone comes from ImageNet weights.

    * ``deeplab``: the released init file. The prefix is dropped; ``layer4.2`` becomes
      the tail (``layer5.0`` in the release); the old classifier ``layer5.*`` is skipped
      when ``num_classes == 19``, as the released loader does. For another class count
      the released loader keeps those keys, which fit nothing, so they are unexpected.
    * ``torchvision``: ResNet (``fc.*`` skipped, ``layer4.2`` -> tail) or VGG-16
      (``features.i`` via :func:`torchvision_feature_index_map`, ``classifier.*`` skipped,
      fc6/fc7 stay fresh).
    * ``dast``: our own segmentor keys (optionally under ``segmentor.``).

    The reference variant's fresh tail shortcut is never in these files and stays at the
    released initialisation; it is reported as missing. ``norm`` defaults to ``caffe``
    for the DeepLab file and ``imagenet`` for torchvision weights.
    """
    _check_arch(arch)
    opts = options or ImportOptions()
    fmt, norm, source = opts.fmt, opts.norm, opts.source
    allow_missing, allow_unexpected = opts.allow_missing, opts.allow_unexpected
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown weight format {fmt!r} (known: {', '.join(FORMATS)})")
    sd = dict(weights_sd)
    detected, prefix = detect_imagenet_format(sd.keys(), arch)
    if fmt != "auto" and fmt != detected:
        raise CheckpointError(f"{source}: looks like {detected} weights, but format {fmt!r} was requested")
    norm = norm or ("imagenet" if detected == "torchvision" else "caffe")
    spec = ModelSpec(arch=arch, num_classes=num_classes, variant=variant, norm=norm, input_size=None)
    nets = build_networks(spec)
    report = ConversionReport(source_format=detected)
    mapped: list[tuple[str, str | None, Tensor]] = []
    hint = ""
    encoder = nets.segmentor.encoder
    n_enc = len(encoder.layer4) if isinstance(encoder, ResNetEncoder) else 0  # VGG-16: no layer4
    for key, v in sd.items():
        inner = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        top = inner.split(".", 1)[0]
        if detected == "deeplab" and top == "layer5":
            # the released rule: skip the old classifier only for 19 classes
            if num_classes == 19:
                report.skipped.append(key)
            else:
                report.unexpected.append(key)
                hint = "the released loader drops the old classifier 'layer5.*' only when num_classes == 19;"
            continue
        if detected == "torchvision" and (
            (arch == "vgg16" and top == "classifier") or (arch != "vgg16" and top == "fc")
        ):
            report.skipped.append(key)
            continue
        if detected == "dast":
            if key.startswith(("discoverer.", "corrector.")):
                report.skipped.append(key)
                continue
            mapped.append((key, "segmentor." + inner, v))
        elif arch == "vgg16":
            dst = _vgg_torchvision_key(inner)
            mapped.append((key, None if dst is None else "segmentor." + dst, v))
        else:
            dst = _resnet_imagenet_key(inner, n_enc)
            mapped.append((key, None if dst is None else "segmentor." + dst, v))
    written = _load_mapped(nets, mapped, report, source)
    _account_missing(nets, written, report, ("segmentor.encoder.", "segmentor.tail."))
    expected = _expected_fresh(arch, variant, detected)
    surprising = [k for k in report.missing if not k.startswith(expected)] if expected else list(report.missing)
    _raise_if(
        report,
        source,
        missing=surprising,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        unexpected_hint=hint,
    )
    return nets, report


def _expected_fresh(arch: str, variant: str, fmt: str) -> tuple[str, ...]:
    """Backbone prefixes an ImageNet file of ``fmt`` never provides."""
    if fmt == "dast":
        return ()
    if arch == "vgg16":
        return ("segmentor.tail.",)  # fc6 / fc7
    if variant == "reference":
        return ("segmentor.tail.0.downsample.",)
    return ()


# ---------------------------------------------------------------------------
# timm backbones


def timm_to_dast(
    weights_sd: Mapping[str, Tensor],
    timm_name: str,
    num_classes: int,
    *,
    output_stride: int | None = None,
    norm: str | None = None,
    allow_unexpected: bool = False,
    allow_missing: bool = False,
    source: str = "weight file",
) -> tuple[Networks, ConversionReport]:
    """Build fresh dast networks whose timm encoder comes from a local state dict.

    The file holds the whole timm model (timm's own format, or torchvision's where the
    keys coincide, as for ResNets) or just its features-only part. Keys of the model
    past the deepest feature map (its classifier, a final norm) are ``skipped``; keys that
    fit no part of the model are ``unexpected``. ``norm`` defaults to ``imagenet``.
    """
    sd = _strip_common_prefix(weights_sd, "module.")
    if any(k.startswith("segmentor.") for k in sd):
        raise CheckpointError(
            f"{source}: this is already a dast checkpoint; use it as model.init (or with --checkpoint)"
        )
    spec = ModelSpec(
        arch="timm",
        num_classes=num_classes,
        variant="paper",
        norm=norm or "imagenet",
        timm_name=timm_name,
        output_stride=output_stride,
    )
    nets = build_networks(spec)
    encoder = nets.segmentor.encoder
    assert isinstance(encoder, TimmEncoder)
    prefix = "segmentor.encoder.body."
    feature_keys = frozenset(k[len(prefix) :] for k in nets.state_tensors() if k.startswith(prefix))
    whole = full_model_keys(encoder)
    report = ConversionReport(source_format="timm")
    mapped: list[tuple[str, str | None, Tensor]] = []
    for key, v in sd.items():
        dst = encoder_key(key, feature_keys)
        if dst is None and key in whole:
            report.skipped.append(key)
        else:
            mapped.append((key, None if dst is None else prefix + dst, v))
    try:
        written = _load_mapped(nets, mapped, report, source)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (does the file hold timm model {timm_name!r}?)") from None
    _account_missing(nets, written, report, (prefix,))
    problems, flags = [], []
    if report.unexpected and not allow_unexpected:
        problems.append(f"{_few(report.unexpected)} fit no part of timm model {timm_name!r}")
        flags.append("--allow-unexpected")
    if report.missing and not allow_missing:
        problems.append(f"{_few(report.missing, strip=prefix)} of its encoder are not in the file")
        flags.append("--allow-missing")
    if problems:
        raise CheckpointError(
            f"{source}: {'; '.join(problems)} (is it a checkpoint of another model?"
            f" {' / '.join(flags)} to go on anyway)"
        )
    return nets, report


def _few(keys: Sequence[str], strip: str = "", shown: int = 3) -> str:
    """``5 keys ('a', 'b', 'c', ...)``: a count and the first few keys."""
    names = ", ".join(repr(k.removeprefix(strip)) for k in keys[:shown])
    more = ", ..." if len(keys) > shown else ""
    return f"{len(keys)} key{'s' if len(keys) > 1 else ''} ({names}{more})"
