"""Setting up a run: its directory, its logging, its config checks and its first networks."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from dast import __version__
from dast.atomic import TMP_MARK, write_json, write_text
from dast.checkpoint import load_checkpoint
from dast.config import Config, config_diff, from_tree, load_yaml_tree, to_yaml
from dast.data.labels import table_for
from dast.errors import ConfigError, UserError
from dast.models.build import check_output_stride
from dast.models.io import ModelSpec, Networks, build_networks, load_state_strict, split_prefixed
from dast.models.known_weights import random_init_warning
from dast.rundir import STAGE1, RunDir, is_second_stage
from dast.training.runtime import Runtime


def read_manifest(paths: RunDir) -> dict[str, Any]:
    if not paths.manifest.exists():
        return {"stages": {}}
    try:
        return json.loads(paths.manifest.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{paths.manifest} is damaged; remove it to restart the run's bookkeeping") from exc


# Keys a resumed run may change (only to larger values) without --force.
GROWABLE = ("train.steps", "self_training.rounds", "self_training.steps")
# Keys a resumed run may change freely: they never change what is trained.
FREE = ("distributed.timeout_s",)


def check_resume_config(stored: Config, requested: Config, manifest: dict[str, Any], force: bool) -> None:
    """Refuse a resumed run whose config differs in anything but larger step counts.

    A longer stage 1 is refused once a round has started, and longer rounds once a
    second round has started: the later stages were built on the shorter results.
    """
    diffs = config_diff(stored, requested)
    rounds = [k for k in manifest.get("stages", {}) if is_second_stage(k)]
    bad = []
    for key in diffs:
        if key in FREE:
            continue
        if key in GROWABLE:
            old, new = _get(stored, key), _get(requested, key)
            if new < old:
                bad.append(f"{key} ({old} -> {new}: smaller)")
            elif key == "train.steps" and rounds:
                bad.append(f"{key} ({old} -> {new}: self-training already started from the shorter stage 1)")
            elif key == "self_training.steps" and len(rounds) > 1:
                bad.append(f"{key} ({old} -> {new}: a later round already started from a shorter round)")
        else:
            bad.append(f"{key} ({_get(stored, key)!r} -> {_get(requested, key)!r})")
    if bad and not force:
        raise ConfigError(
            "the run directory was started with a different config: "
            + "; ".join(bad[:4])
            + ("; ..." if len(bad) > 4 else "")
            + ". Only larger step counts may change on resume (use --force to override)"
        )


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# Warnings of the data modules (e.g. a sample skipped under ``on_corrupt: skip``) also go to
# the run's log.
DATA_LOGGER = "dast.data"


def run_logger(run_dir: Path) -> logging.Logger:
    """The logger of the run in ``run_dir`` (its handlers come from :func:`setup_logging`)."""
    return logging.getLogger(f"dast.run.{run_dir.resolve()}")


def setup_logging(run_dir: Path, rt: Runtime) -> logging.Logger:
    log = run_logger(run_dir)
    log.setLevel(logging.INFO)
    log.propagate = False
    close_logging(log)
    if rt.is_main:
        fh = logging.FileHandler(RunDir(run_dir).log, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(logging.WARNING)
        sh.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(sh)
        for h in (fh, sh):
            logging.getLogger(DATA_LOGGER).addHandler(h)
    return log


def run_header_lines(cfg: Config, rt: Runtime, sizes: dict[str, int]) -> list[str]:
    """The lines a run's ``log.txt`` opens with (at each start and resume): versions, device,
    dataset sizes and the hash of the resolved config (the ``config.yaml`` of the run)."""
    device = str(rt.device)
    if rt.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(rt.device)})"
    digest = hashlib.sha256(to_yaml(cfg).encode("utf-8")).hexdigest()[:16]
    return [
        f"dast {__version__}, torch {torch.__version__}, python {platform.python_version()}",
        f"device {device}, {rt.world_size} process(es), {torch.get_num_threads()} CPU threads per process",
        "datasets: " + ", ".join(f"{role} {n} images" for role, n in sizes.items()),
        f"config sha256 {digest} (config.yaml, resolved)",
    ]


def close_logging(log: logging.Logger) -> None:
    """Detach and close the handlers :func:`setup_logging` gave ``log``."""
    data_log = logging.getLogger(DATA_LOGGER)
    for h in list(log.handlers):
        log.removeHandler(h)
        data_log.removeHandler(h)
        h.close()


# The corrector's five 4x4 stride-2 convolutions need at least 32 pixels on each side.
MIN_CORRECTOR_SIDE = 32


def check_training_sizes(cfg: Config) -> None:
    """Refuse training images too small for the corrector (instead of a convolution error)."""
    if not cfg.adversarial.corrector:
        return
    for name in ("source", "target"):
        ds = getattr(cfg, name)
        key, size = (f"{name}.augment.crop", ds.augment.crop) if ds.augment.crop else (f"{name}.size", ds.size)
        if size is not None and min(size) < MIN_CORRECTOR_SIDE:
            raise ConfigError(
                f"config key '{key}' is {list(size)}: training images need at least "
                f"{MIN_CORRECTOR_SIDE} pixels on each side for the corrector"
            )


def model_spec_for(cfg: Config) -> ModelSpec:
    """The model spec a run of ``cfg`` trains and stores in its checkpoints."""
    table = table_for(cfg.source, cfg.model.num_classes)
    adv = cfg.adversarial
    if cfg.model.arch != "timm":  # timm backbones check their stride when they are built, per family
        try:
            check_output_stride(cfg.model.arch, cfg.model.output_stride)
        except ValueError as exc:
            raise ConfigError(f"config key 'model.output_stride': {exc}") from None
    return ModelSpec(
        arch=cfg.model.arch,
        num_classes=cfg.model.num_classes,
        variant=cfg.variant,
        norm=cfg.model.norm,
        input_size=cfg.target.size or None,
        discoverer=adv.discoverer,
        corrector=adv.corrector,
        attention=adv.attention,
        corrector_width=adv.corrector_width,
        timm_name=cfg.model.timm_name,
        output_stride=cfg.model.output_stride,
        class_names=list(table.names),
        class_colors=list(table.colors),
    )


def initial_networks(cfg: Config, spec: ModelSpec, log: logging.Logger | None = None) -> Networks:
    """Fresh networks, with the segmentor (and any stored discriminators) from ``model.init``;
    warns (on ``log``) when a ResNet-101 / VGG-16 run has no init and starts from random weights."""
    warning = random_init_warning(cfg.model.arch, cfg.model.init)
    if warning:
        (log or logging.getLogger(__name__)).warning(warning)
    nets = build_networks(spec, pretrained=cfg.model.pretrained)
    if cfg.model.init:
        tensors, meta = load_checkpoint(cfg.model.init)
        init_spec = meta.get("model", {})
        for key in ("arch", "num_classes", "timm_name"):
            if key in init_spec and init_spec[key] != getattr(spec, key):
                raise UserError(
                    f"model.init {cfg.model.init} is for {key}={init_spec[key]!r}, "
                    f"the config asks for {getattr(spec, key)!r}"
                )
        load_state_strict(nets.segmentor, split_prefixed(tensors, "segmentor"), "segmentor", cfg.model.init)
        for name, m in (("discoverer", nets.discoverer), ("corrector", nets.corrector)):
            part = split_prefixed(tensors, name)
            if m is not None and part:
                load_state_strict(m, part, name, cfg.model.init)
    return nets


def end_torn_line(path: Path) -> None:
    """Terminate a last line left without its newline by a killed writer."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, 2)
        if fh.read(1) != b"\n":
            fh.write(b"\n")


def discard_new_run(run_dir: Path, created: Path | None) -> None:
    """Remove what a failed fresh run wrote: the folders it created, or the contents of
    the empty folder it was given."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path, cfg: Config | None, resume: bool, force: bool) -> Config:
    """Create or validate the run directory; return the config to run with."""
    paths = RunDir(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} exists and is not a directory")
    if resume:
        if not paths.config.exists():
            raise UserError(f"nothing to resume in {run_dir}: no config.yaml (start it without --resume)")
        stored = from_tree(load_yaml_tree(paths.config), str(paths.config))
        if cfg is None:
            return stored
        manifest = read_manifest(paths)
        # a round whose pseudo labels exist has started, even before the manifest says so
        for name in paths.stage_names():
            if is_second_stage(name):
                manifest.setdefault("stages", {}).setdefault(name, {"status": "started"})
        check_resume_config(stored, cfg, manifest, force)
        return cfg
    if cfg is None:
        raise UserError("--config is required unless --resume names an existing run directory")
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise UserError(
            f"run directory {run_dir} already exists and is not empty (use --resume to continue it, or --force)"
        )
    return cfg


def first_missing(path: Path) -> Path | None:
    """The outermost missing folder on the way to ``path`` (None when ``path`` exists)."""
    missing = None
    p = path.absolute()
    while not p.exists() and p != p.parent:
        missing, p = p, p.parent
    return missing


def _step_of(line: str) -> float:
    """The global step of a ``scalars.jsonl`` line (infinite for a torn or empty one)."""
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")


def fork_stage1(source: Path, dest: Path) -> None:
    """Start run ``dest`` from run ``source``'s complete stage 1 (``source`` may still be
    training its later stages): its stage folder, its
    manifest entry, its evaluation history and its scalars (a run that differs only after
    stage 1, e.g. in its self-training, continues from there with ``--resume --force``).

    ``dest`` must not exist yet; it is written under a temporary name and renamed, so a
    failure leaves nothing behind."""
    src, new = RunDir(source), RunDir(dest.with_name(f"{dest.name}{TMP_MARK}fork"))
    entry = read_manifest(src)["stages"].get(STAGE1, {})
    if entry.get("status") != "complete" or not src.stage(STAGE1).selected.exists():
        raise UserError(f"cannot fork {source}: its stage 1 is not complete")
    if dest.exists():
        raise UserError(f"cannot fork into {dest}: it exists")
    shutil.rmtree(new.root, ignore_errors=True)
    try:
        shutil.copytree(src.stage(STAGE1).root, new.stage(STAGE1).root)
        shutil.copy2(src.config, new.config)
        write_json(new.manifest, {"stages": {STAGE1: entry}})
        if src.curves.exists():
            write_json(new.curves, [h for h in json.loads(src.curves.read_text()) if h.get("stage") == STAGE1])
        steps = int(entry.get("steps", 0))
        if src.scalars.exists():  # the parent may be appending its later stages' lines meanwhile
            lines = [ln for ln in src.scalars.read_text().splitlines() if _step_of(ln) <= steps]
            write_text(new.scalars, "".join(f"{ln}\n" for ln in lines))
        new.root.rename(dest)
    finally:
        shutil.rmtree(new.root, ignore_errors=True)
