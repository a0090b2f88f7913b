"""Typed, validated configuration: pydantic models, YAML files and ``--set`` overrides.

* Unknown keys and wrong types are rejected with one line that names the key and, for
  a misspelt key, suggests the nearest valid one.
* A config file may start with ``extends: other.yaml`` (relative to the file, or the name
  of a packaged config such as ``base/common``), or a list of them (later ones win), to
  inherit from other files; mappings are merged key by key.
* ``--config`` takes a file or the name of a config shipped in ``dast/configs/``
  (:func:`resolve_config_path`); a file's own ``paper:`` block (the paper's number for its
  row, :class:`PaperRow`) is metadata for ``dast configs`` and is not inherited or trained on.
* Values left at ``null`` that depend on the variant (``paper`` or ``reference``) are
  filled in by :func:`resolve`, so the saved config of a run is fully explicit.
"""

from __future__ import annotations

import copy
import difflib
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dast.errors import ConfigError, UserError

DatasetKind = Literal["gta5", "synthia", "cityscapes", "folder", "synthetic"]

PACKAGED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassSpec(_Strict):
    """One class of a custom (folder) dataset."""

    name: str
    color: tuple[int, int, int] = (0, 0, 0)


class AugmentConfig(_Strict):
    """Optional augmentation (all off in the paper configs)."""

    flip: bool = False
    scale: tuple[float, float] | None = None
    crop: tuple[int, int] | None = None  # (width, height)
    # photometric, on images only (docs/datasets.md); 0 = off. A jitter of strength s
    # multiplies by a factor drawn from [max(0, 1 - s), 1 + s].
    brightness: float = Field(default=0.0, ge=0)
    contrast: float = Field(default=0.0, ge=0)
    saturation: float = Field(default=0.0, ge=0)
    hue: float = Field(default=0.0, ge=0, le=0.5)  # largest hue shift, in turns of the colour wheel
    blur_prob: float = Field(default=0.0, ge=0, le=1)  # Gaussian blur with a sigma drawn from blur_sigma
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # (min, max) in pixels
    grayscale_prob: float = Field(default=0.0, ge=0, le=1)

    @field_validator("blur_sigma")
    @classmethod
    def _sigma_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1]:
            raise ValueError("blur_sigma must be (min, max) with 0 <= min <= max")
        return v


class RareClassSamplingConfig(_Strict):
    """Rare-class sampling of a labelled source (DAFormer; an addition to the paper): a class
    is drawn with probability softmax((1 - f_c) / temperature) over the classes' pixel
    shares f_c, then an image holding more than ``min_pixels`` of it; a random crop must
    hold more than ``min_crop_ratio * min_pixels`` of it (up to 10 draws). Published at
    Cityscapes scale: temperature 0.01, min_pixels 3000, min_crop_ratio 0.5."""

    temperature: float = Field(default=0.01, gt=0)
    min_pixels: int = Field(default=3000, ge=0)
    min_crop_ratio: float = Field(default=0.5, ge=0)


class DatasetConfig(_Strict):
    """Where a dataset lives and how its images are prepared."""

    kind: DatasetKind
    root: str | None = None
    split: str = "train"
    list_file: str | None = None  # a text file naming the images to use, one per line
    size: tuple[int, int] | None = None  # (width, height) the images are resized to
    with_labels: bool = True
    images: str = "images"  # folder datasets: image sub-folder
    labels: str | None = "labels"  # folder datasets: label sub-folder, null for none
    classes: list[ClassSpec] | None = None  # folder datasets
    domain: Literal["source", "target"] = "source"  # synthetic datasets
    count: int = Field(default=200, ge=1)  # synthetic datasets
    # synthetic datasets: what differs between the domains
    shift: Literal["appearance", "appearance+layout", "photographic"] = "appearance"
    augment: AugmentConfig = AugmentConfig()
    on_corrupt: Literal["fail", "skip"] = "fail"
    # a labelled source: sample images by class rarity (null: uniformly, as the paper)
    rare_class_sampling: RareClassSamplingConfig | None = None


class ModelConfig(_Strict):
    """The segmentor."""

    arch: Literal["resnet101", "vgg16", "small", "timm"] = "resnet101"
    num_classes: int = Field(default=19, ge=2)
    init: str | None = None  # a dast checkpoint (e.g. from `dast convert imagenet`)
    norm: Literal["caffe", "imagenet", "unit"] = "caffe"
    batchnorm: Literal["batch", "per_image"] = "batch"  # per_image keeps batch-1 normalisation at any batch size
    output_stride: int | None = None  # null: the architecture's default (8)
    timm_name: str | None = None  # arch timm: a timm.list_models() name, e.g. resnet50 (docs/backbones.md)
    pretrained: bool = False  # arch timm: timm's own pretrained weights (network access or timm's cache)


class AdversarialConfig(_Strict):
    """The discoverer D, the corrector C and their losses."""

    discoverer: bool = True
    corrector: bool = True
    attention: bool = True
    loss: Literal["lsgan", "bce"] = "lsgan"
    lambda_d: float = 0.01
    lambda_c: float = 0.01
    # which terms the attention map weights: the segmentor's L_adv^C(E,P) on target outputs
    # ("segmentor", the paper's text), the target term of C's own loss ("corrector"), both,
    # or none (the release); null: the variant's choice. "attention" is the old name of "both".
    corrector_weighting: Literal["none", "segmentor", "corrector", "both"] | None = None
    corrector_width: int = Field(default=64, ge=1)  # channels of C's first conv (paper: 64; 128, 256, 512 follow)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    # an addition to the paper (off in every paper config): the segmentor's adversarial terms
    # are 0 for the first warmup_steps stage-1 iterations, then ramp linearly to full over warmup_ramp
    warmup_steps: int = Field(default=0, ge=0)
    warmup_ramp: int = Field(default=0, ge=0)

    @field_validator("corrector_weighting", mode="before")
    @classmethod
    def _legacy_weighting(cls, v: Any) -> Any:
        return "both" if v == "attention" else v


class TrainConfig(_Strict):
    """Stage 1 (adversarial training) and the optimiser of the segmentor."""

    steps: int = Field(default=150000, ge=0)
    poly_steps: int = Field(default=250000, ge=1)
    lr: float = 2.5e-4
    head_lr_mult: float | None = None  # null: 10 (released VGG-16: 1, one group)
    duplicate_params: bool | None = None  # null: the released duplicated list (reference, ResNet)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    batch_size: int = Field(default=1, ge=1)
    num_workers: int = Field(default=2, ge=0)
    reuse_discoverer: bool = True
    # forward the target images through the segmentor in train mode at every step, without
    # any loss (BatchNorm statistics only): the source_only_bn control of the demo
    forward_target: bool = False
    checkpoint_every: int = Field(default=2000, ge=1)
    keep_last: int = Field(default=3, ge=1)
    log_every: int = Field(default=10, ge=1)
    image_every: int = Field(default=1000, ge=1)
    eval_every: int = Field(default=2000, ge=1)
    digest_every: int = Field(default=0, ge=0)  # >0: each rank logs a parameter checksum (distributed debugging)


class StrongAugmentConfig(_Strict):
    """The strong augmentation of the online stage's mixed image (DACS): colour jitter of
    strength ``jitter`` (0: off) applied with probability ``jitter_prob`` (the published code
    jitters when U(0, 1) > 0.2, i.e. with probability 0.8), and Gaussian blur with probability
    0.5 and sigma ~ U(0.15, 1.15)."""

    jitter: float = Field(default=0.2, ge=0, le=0.5)
    jitter_prob: float = Field(default=0.8, ge=0, le=1)
    blur: bool = True


class MaskingConfig(_Strict):
    """Masked image consistency (MIC): the student also predicts the target image with random
    blocks masked out (each block cell masked with probability ``ratio``), against the
    teacher's labels of the unmasked image, with loss weight ``weight``. ``block`` is the
    cell size at 1024 x 1024 and is scaled to the image (published: ratio 0.7, block 64)."""

    ratio: float = Field(default=0.7, ge=0, lt=1)
    block: int = Field(default=64, ge=1)
    weight: float = Field(default=1.0, ge=0)


class FeatureDistanceConfig(_Strict):
    """DAFormer's ImageNet feature distance: the L2 distance between the encoder's features
    on source images and those of the frozen initial encoder (``model.init``; without one,
    the encoder at the start of the online stage), over the pixels of ``classes``, times
    ``weight`` (published: 0.005 on the Cityscapes "thing" classes 6, 7, 11-18)."""

    weight: float = Field(default=0.005, ge=0)
    classes: list[int] = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]


class OnlineConfig(_Strict):
    """Online self-training with a mean teacher (DACS/DAFormer; an addition to the paper).

    The teacher, an EMA of the student (``ema``), labels the un-augmented target image; the
    loss is the per-pixel cross-entropy on its argmax, weighted by the share of pixels whose
    confidence is >= ``threshold`` (rows ``ignore_top`` / ``ignore_bottom`` weigh 0), on a
    ClassMix of source and target (``classmix``) under the strong augmentation. The stage
    trains ``self_training.steps`` iterations with ``self_training``'s learning rates."""

    ema: float = Field(default=0.999, ge=0, le=1)
    threshold: float = Field(default=0.968, ge=0, le=1)
    ignore_top: int = Field(default=0, ge=0)
    ignore_bottom: int = Field(default=0, ge=0)
    weight: float = Field(default=1.0, ge=0)  # of the mixed image's loss
    adversarial: Literal["keep", "drop"] = "keep"  # stage 1's adversarial terms during the online stage
    classmix: bool = True
    augment: StrongAugmentConfig = StrongAugmentConfig()
    masking: MaskingConfig | None = None
    feature_distance: FeatureDistanceConfig | None = None


class SelfTrainingConfig(_Strict):
    """Stage 2: rounds of class-balanced pseudo-labelling and retraining (``mode: rounds``, the
    paper), or one online stage with a mean teacher (``mode: online``, an addition)."""

    mode: Literal["rounds", "online"] = "rounds"
    online: OnlineConfig = OnlineConfig()
    rounds: int = Field(default=0, ge=0)
    steps: int = Field(default=20000, ge=1)
    portion: float = Field(default=0.5, gt=0.0, le=1.0)
    portion_step: float = 0.0  # q_k = portion + k * portion_step, capped at max_portion
    max_portion: float = Field(default=1.0, gt=0.0, le=1.0)
    cap: float = 0.9
    mu: float = 1.0
    adversarial: bool = True
    lr: float | None = None
    poly_steps: int | None = None
    head_lr_mult: float | None = None
    # how the class thresholds are estimated: streaming histograms, or the released code's
    # exact sort (bit-identical to it); "mode" is this key's old name
    estimator: Literal["histogram", "exact-reference"] = "histogram"
    # BatchNorm while a round trains: "train" (batch statistics, running ones updated) or
    # "frozen" (eval mode, the stage-1 running statistics, as the released DAST_train.py); null: the variant's
    batchnorm: Literal["train", "frozen"] | None = None
    eval_every: int | None = Field(default=None, ge=1)  # null: train.eval_every
    # ratio: released argmax(p/t); threshold: keep argmax p where p >= t_c
    rule: Literal["ratio", "threshold"] = "ratio"
    bins: int = Field(default=65536, ge=16)
    subsample: int = Field(default=4, ge=1)
    preview_count: int = Field(default=8, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _legacy_mode(cls, data: Any) -> Any:
        """``mode: histogram | exact-reference`` is the old spelling of ``estimator``."""
        if isinstance(data, dict) and data.get("mode") in ("histogram", "exact-reference") and "estimator" not in data:
            data = {k: v for k, v in data.items() if k != "mode"} | {"estimator": data["mode"]}
        return data


class SelectionConfig(_Strict):
    """Label-free model selection on an FDA-restyled synthetic validation set."""

    enabled: bool = True
    num_images: int = Field(default=500, ge=1)
    betas: list[float] = [0.5, 0.9]
    select_on: Literal["synthetic", "target", "last"] = "synthetic"
    # an addition to the paper: the final model is the best selected snapshot over all
    # stages (stage 1 and every round) instead of the last round's
    across_stages: bool = False

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: list[float]) -> list[float]:
        if not v or any(not (0.0 < b <= 1.0) for b in v):
            raise ValueError("each beta must be in (0, 1]")
        return v


class RuntimeConfig(_Strict):
    """Device and speed settings."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    compile: bool = False  # torch.compile the segmentor halves (state-dict keys unchanged)
    cuda_graphs: bool = False  # replay the whole iteration as CUDA graphs (single GPU; see docs/performance.md)
    # auto: foreach with cuda_graphs, else released (torch SGD/Adam)
    optimizers: Literal["auto", "released", "foreach"] = "auto"
    deterministic: bool | None = None  # null: true on CPU, false on CUDA (cuDNN autotuning)


class DistributedConfig(_Strict):
    """Data-parallel settings under torchrun."""

    lr_scaling: Literal["keep", "linear"] = "keep"
    sync_bn: bool = False
    # seconds a collective may wait for the other ranks before the run stops (a hung rank);
    # null: 300 on CPU (gloo), 600 on CUDA (NCCL); see docs/distributed.md
    timeout_s: float | None = Field(default=None, gt=0)


class FaultConfig(_Strict):
    """What to do with a non-finite loss."""

    policy: Literal["skip", "rollback"] = "skip"
    max_consecutive: int = Field(default=5, ge=1)
    lr_factor: float = Field(default=0.5, gt=0.0, le=1.0)


class Config(_Strict):
    """A whole DAST run."""

    seed: int = 0
    variant: Literal["paper", "reference"] = "paper"
    model: ModelConfig = ModelConfig()
    source: DatasetConfig
    target: DatasetConfig
    val: DatasetConfig | None = None
    adversarial: AdversarialConfig = AdversarialConfig()
    train: TrainConfig = TrainConfig()
    self_training: SelfTrainingConfig = SelfTrainingConfig()
    selection: SelectionConfig = SelectionConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    distributed: DistributedConfig = DistributedConfig()
    faults: FaultConfig = FaultConfig()


# ---------------------------------------------------------------------------------------
# Loading, merging, overriding


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys.extend(_all_keys(sub, dotted + "."))
    return keys


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        sub = _submodel(arg)
        if sub is not None:
            return sub
    return None


def valid_keys() -> list[str]:
    """Every dotted key a config accepts."""
    return _all_keys(Config)


def _suggest(key: str) -> str:
    keys = valid_keys()
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    same_level = [k for k in keys if k.startswith(parent) and "." not in k[len(parent) :]]
    match = difflib.get_close_matches(key, same_level, n=1, cutoff=0.5) or difflib.get_close_matches(
        key, keys, n=1, cutoff=0.6
    )
    return f" (did you mean '{match[0]}'?)" if match else ""


def _format_error(err: ValidationError, source: str, from_set: dict[str, str] | None = None) -> str:
    """Every problem of a validation error, one line each (joined by newlines): its key path,
    where the value came from (``--set KEY=VALUE`` or the file) and, for a misspelt key or
    choice, the nearest valid one."""
    return "\n".join(_format_problem(e, source, from_set or {}) for e in err.errors())


def _blame(loc: str, source: str, from_set: dict[str, str]) -> str:
    """`` in --set a.b=c`` when an override set ``loc`` (or a mapping above it), else `` in FILE``."""
    parts = loc.split(".")
    for i in range(len(parts), 0, -1):
        item = from_set.get(".".join(parts[:i]))
        if item is not None:
            return f" in --set {item}"
    return f" in {source}" if source else ""


def _format_problem(e: Any, source: str, from_set: dict[str, str]) -> str:
    loc = ".".join(str(p) for p in e["loc"])
    where = _blame(loc, source, from_set)
    if e["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'{where}{_suggest(loc)}"
    if e["type"] == "missing":
        return f"config key '{loc}' is required{where}"
    value = e.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"config key '{loc}'{where}: {e['msg'].lower()}, got {shown}{_suggest_choice(e)}"


def _suggest_choice(e: Any) -> str:
    """`` (did you mean 'resnet101'?)`` for a misspelt choice of a ``Literal`` key."""
    value = e.get("input")
    if e["type"] != "literal_error" or not isinstance(value, str):
        return ""
    choices = re.findall(r"'([^']*)'", str((e.get("ctx") or {}).get("expected", "")))
    match = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``; nested mappings merge key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config (a file or a packaged config name), following ``extends:`` chains.

    Each file's ``paper:`` block is validated and dropped (see :func:`read_paper_row`).
    """
    p = resolve_config_path(path)
    if p.resolve() in _seen:
        raise ConfigError(f"config {p} extends itself")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config {p} is not valid YAML{at}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a mapping at the top level")
    _paper_row(data.pop("paper", None), p)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    base: dict[str, Any] = {}
    for parent in parents if isinstance(parents, list) else [parents]:  # later parents win
        tree = load_yaml_tree(resolve_config_path(str(parent), relative_to=p.parent), _seen + (p.resolve(),))
        base = deep_merge(base, tree)
    return deep_merge(base, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b=c`` into (["a", "b"], value), the value read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config tree (validation happens afterwards); every
    malformed or unknown override is listed in one :class:`ConfigError`, a line each."""
    out, _, problems = _apply_overrides(tree, overrides)
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def _apply_overrides(
    tree: dict[str, Any], overrides: Iterable[str]
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(the tree with the valid overrides applied, {dotted key: the ``--set`` item that set it},
    a line per override that is malformed or names no config key)."""
    out = copy.deepcopy(tree)
    known = set(valid_keys())
    applied: dict[str, str] = {}
    problems: list[str] = []
    for item in overrides:
        try:
            path, value = parse_override(item)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        dotted = ".".join(path)
        if dotted not in known and not any(k.startswith(dotted + ".") for k in known):
            problems.append(f"unknown config key '{dotted}' in --set{_suggest(dotted)}")
            continue
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        applied[dotted] = item
    return out, applied, problems


def from_tree(
    tree: dict[str, Any], source: str = "", *, from_set: dict[str, str] | None = None, earlier: Iterable[str] = ()
) -> Config:
    """Validate a raw tree into a :class:`Config` and resolve variant defaults.

    Every problem is listed in one :class:`ConfigError`, a line each (``earlier``: lines
    found before validation, listed first). ``from_set`` ({dotted key: ``--set`` item}) makes
    a bad value that came from an override name that override instead of ``source``."""
    problems = list(earlier)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        problems.append(_format_error(err, source, from_set))
    if problems:
        raise ConfigError("\n".join(problems)) from None
    return resolve(cfg)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (a file or a packaged config name, see :func:`resolve_config_path`),
    apply ``--set`` overrides, validate and resolve it; every mistake of the file and of the
    overrides is listed in one :class:`ConfigError`."""
    p = resolve_config_path(path)
    tree, from_set, problems = _apply_overrides(load_yaml_tree(p), overrides)
    return from_tree(tree, str(p), from_set=from_set, earlier=problems)


# ---------------------------------------------------------------------------------------
# Packaged configs: names, resolution, the paper's number for each row


def packaged_config_names(include_base: bool = False) -> list[str]:
    """The names of the configs shipped in ``dast/configs/`` (``gta5/resnet101/dast``, ``demo``,
    ...), sorted; the ``base/`` building blocks only with ``include_base``."""
    names = [p.relative_to(PACKAGED_CONFIG_DIR).with_suffix("").as_posix() for p in PACKAGED_CONFIG_DIR.rglob("*.yaml")]
    return sorted(n for n in names if include_base or not n.startswith("base/"))


def _config_name(name: str) -> str:
    """``configs/gta5/resnet101/dast.yaml`` -> ``gta5/resnet101/dast``: the packaged-config
    name a string stands for (a leading ``configs/``, written for a source checkout, and
    the ``.yaml`` suffix are optional)."""
    name = name.strip().replace("\\", "/")
    for prefix in ("dast/configs/", "configs/"):
        name = name.removeprefix(prefix)
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name


def _packaged_config(name: str) -> Path | None:
    """The packaged file a config name refers to, or None."""
    name = _config_name(name)
    if not name or Path(name).is_absolute():
        return None
    root = PACKAGED_CONFIG_DIR.resolve()
    candidate = (root / f"{name}.yaml").resolve()
    return candidate if candidate.is_relative_to(root) and candidate.is_file() else None


def _nearby_files(path: Path) -> list[str]:
    """Files beside ``path`` that it may have meant: the other YAML suffix first, then the
    YAML files of its folder with a close name."""
    folder = path.parent
    if not folder.is_dir():
        return []
    swapped = [path.with_suffix(x) for x in (".yaml", ".yml") if path.suffix in (".yaml", ".yml", "")]
    found = [str(c) for c in swapped if c != path and c.is_file()]
    try:
        others = [c.name for c in folder.iterdir() if c.suffix in (".yaml", ".yml") and c.is_file()]
    except OSError:
        others = []
    found += [str(folder / n) for n in difflib.get_close_matches(path.name, others, n=3, cutoff=0.6)]
    return list(dict.fromkeys(found))


def _config_suggestions(name: str, path: Path | None = None) -> str:
    nearby = _nearby_files(path) if path is not None else []
    if nearby:
        return " (did you mean " + " or ".join(f"'{n}'" for n in nearby[:3]) + "?)"
    names = packaged_config_names(include_base=True)
    key = _config_name(name)
    close = [n for n in names if n.endswith("/" + key) or n.startswith(key + "/")] if key else []
    close += [n for n in difflib.get_close_matches(key, names, n=3, cutoff=0.6) if n not in close]
    if not close:
        return "; `dast configs` lists the packaged configs"
    return " (did you mean " + " or ".join(f"'{n}'" for n in close[:3]) + "?)"


def resolve_config_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """The config file ``name_or_path`` refers to.

    An existing file wins (relative paths are taken from ``relative_to`` when given, else
    from the working directory). Otherwise it is the name of a packaged config:
    ``gta5/resnet101/dast``, with or without ``.yaml``, or ``demo``; a leading
    ``configs/`` (a path written for the source checkout) is accepted too. Neither is a
    :class:`ConfigError` that suggests close names.
    """
    raw = str(name_or_path)
    p = Path(raw)
    if relative_to is not None and not p.is_absolute():
        p = relative_to / p
    if p.is_file():
        return p
    packaged = _packaged_config(raw)
    if packaged is not None:
        return packaged
    if p.is_dir():
        raise ConfigError(f"config file not found: {p} is a directory{_config_suggestions(raw)}")
    raise ConfigError(
        f"config file not found: {p}: no such file and no packaged config of that name{_config_suggestions(raw, p)}"
    )


class PaperRow(_Strict):
    """The ``paper:`` block of a packaged config: what the paper reports for its row.

    ``miou`` is GTA5 -> Cityscapes mIoU over 19 classes; ``miou_16`` / ``miou_13`` are the
    SYNTHIA -> Cityscapes mIoU over 16 classes and mIoU* over 13. ``None`` means the paper
    does not report it.
    """

    row: str
    tables: list[int] = []
    miou: float | None = None
    miou_16: float | None = None
    miou_13: float | None = None
    note: str | None = None


def _paper_row(block: Any, source: Path) -> PaperRow | None:
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"config {source}: 'paper' must be a mapping (row, tables, miou, ...)")
    try:
        return PaperRow.model_validate(block)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in ("paper", *e["loc"]))
        raise ConfigError(f"config key '{loc}' in {source}: {e['msg'].lower()}") from None


def read_paper_row(path: str | Path) -> PaperRow | None:
    """The ``paper:`` block of one config file itself (not inherited), or None."""
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {p} is not valid YAML") from exc
    return _paper_row(data.get("paper") if isinstance(data, dict) else None, p)


VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    # The paper weights the segmentor's corrector loss by the attention map; the release does not.
    # Stage 2 of the release: SGD lr 2e-4, poly over 100k steps, one parameter group.
    # Stage 2 of the release also trains with BatchNorm in eval mode (model.eval() in test()/val()).
    "paper": {
        "corrector_weighting": "segmentor",
        "st_lr": 2.5e-4,
        "st_poly_steps": 100000,
        "st_head": 10.0,
        "st_batchnorm": "train",
    },
    "reference": {
        "corrector_weighting": "none",
        "st_lr": 2e-4,
        "st_poly_steps": 100000,
        "st_head": 1.0,
        "st_batchnorm": "frozen",
    },
}


def resolve(cfg: Config) -> Config:
    """Fill the variant-dependent ``null`` values; return a new, fully explicit config."""
    d = VARIANT_DEFAULTS[cfg.variant]
    out = cfg.model_copy(deep=True)
    adv = out.adversarial
    if adv.corrector_weighting is None:
        wants = d["corrector_weighting"]
        adv.corrector_weighting = wants if (adv.attention and adv.discoverer) else "none"
    tr = out.train
    released_vgg = cfg.variant == "reference" and out.model.arch == "vgg16"
    if tr.head_lr_mult is None:
        tr.head_lr_mult = 1.0 if released_vgg else 10.0
    if tr.duplicate_params is None:
        tr.duplicate_params = cfg.variant == "reference" and out.model.arch != "vgg16"
    st = out.self_training
    if st.lr is None:
        st.lr = d["st_lr"]
    if st.poly_steps is None:
        st.poly_steps = d["st_poly_steps"]
    if st.head_lr_mult is None:
        st.head_lr_mult = d["st_head"]
    if st.batchnorm is None:
        st.batchnorm = d["st_batchnorm"]
    if adv.attention and not adv.discoverer:
        raise ConfigError("config key 'adversarial.attention' needs 'adversarial.discoverer: true'")
    _check_backbone(out)
    _check_folder_classes(out)
    _inherit_classes(out)
    return out


def _check_folder_classes(cfg: Config) -> None:
    """A folder dataset's class list has ``model.num_classes`` entries."""
    for name in ("source", "target", "val"):
        ds = getattr(cfg, name)
        if ds is not None and ds.kind == "folder" and ds.classes is not None:
            if len(ds.classes) != cfg.model.num_classes:
                raise ConfigError(
                    f"config key 'model.num_classes' is {cfg.model.num_classes} but '{name}.classes' "
                    f"lists {len(ds.classes)} classes"
                )


def _inherit_classes(cfg: Config) -> None:
    """A folder target or val set with no class list of its own (no ``classes``, no
    ``ROOT/classes.yaml``) takes the source's, written out so that the saved config is
    explicit: an unlabelled target needs no ``classes.yaml``. Nothing is filled in when the
    source's class list cannot be read or does not have ``model.num_classes`` entries (the
    source's own error says why when it is built)."""
    missing = [
        ds
        for ds in (cfg.target, cfg.val)
        if ds is not None
        and ds.kind == "folder"
        and ds.classes is None
        and not (ds.root is not None and (Path(ds.root) / "classes.yaml").is_file())
    ]
    if not missing:
        return
    from dast.data.labels import table_for  # noqa: PLC0415 - numpy, cityscapesscripts: only for folder datasets

    try:
        table = table_for(cfg.source, cfg.model.num_classes)
    except (UserError, OSError):  # no readable source class list: the source's own error says why
        return
    inherited = [ClassSpec(name=n, color=c) for n, c in zip(table.names, table.colors)]
    for ds in missing:
        ds.classes = [c.model_copy() for c in inherited]


def _check_backbone(cfg: Config) -> None:
    """The ``model.arch: timm`` keys fit together (see docs/backbones.md)."""
    m = cfg.model
    if m.arch != "timm":
        for key, value in (("timm_name", m.timm_name), ("pretrained", m.pretrained)):
            if value:
                raise ConfigError(
                    f"config key 'model.{key}' applies to model.arch: timm only (arch is {m.arch!r}; "
                    "for resnet101/vgg16 weights use `dast convert imagenet` and model.init)"
                )
        allowed = (4, 8) if m.arch == "small" else (8,)
        if m.output_stride is not None and m.output_stride not in allowed:
            raise ConfigError(
                f"config key 'model.output_stride': output stride {m.output_stride} is not supported by "
                f"the {m.arch} architecture (supported: {', '.join(map(str, allowed))})"
            )
        return
    if not m.timm_name:
        raise ConfigError(
            "config key 'model.timm_name' is required with model.arch: timm (a timm model, e.g. resnet50)"
        )
    if cfg.variant == "reference":
        raise ConfigError(
            "model.arch: timm needs variant: paper (the reference variant reproduces the released DeepLab networks)"
        )
    if m.norm == "caffe" or (m.pretrained and m.norm != "imagenet"):
        logging.getLogger(__name__).warning(
            "model.norm is %r, but timm backbones expect model.norm: imagenet (RGB, ImageNet mean and std)", m.norm
        )


def to_yaml(cfg: Config) -> str:
    """The config as YAML, with every value explicit."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_diff(a: Config, b: Config, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return _diff(da, db, prefix)


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out.extend(_diff(a.get(k), b.get(k), f"{prefix}{k}."))
        return out
    return [] if a == b else [prefix.rstrip(".")]
