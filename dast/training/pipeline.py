"""The whole DAST method in one call: stage 1 -> selection -> K self-training rounds ->
final evaluation, each stage resumable, all outputs in one run directory::

    RUN/config.yaml            the resolved config
    RUN/manifest.json          which stages are complete, and what each selected
    RUN/log.txt                plain-text log
    RUN/tb/                    TensorBoard event files
    RUN/stage1/                checkpoints/, best.safetensors, selected.safetensors
    RUN/round<k>/pseudo_labels/  label PNGs, previews, stats.json, COMPLETE
    RUN/round<k>/              checkpoints/, best.safetensors, selected.safetensors
    RUN/final/                 model.safetensors, metrics.json
    RUN/scalars.jsonl          every logged scalar (losses, learning rates, evaluations)
    RUN/curves.json, RUN/figure4.png   selection score vs target mIoU over iterations

Crash safety, resume and the config-change policy are described in docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dast.atomic import remove_stale_temps, write_json, write_text
from dast.checkpoint import load_checkpoint
from dast.config import Config, config_diff, from_tree, load_yaml_tree, to_yaml
from dast.errors import ConfigError, UserError
from dast.models.io import ModelSpec, Networks, assign_weights, build_networks, save_networks
from dast.training.runtime import Runtime, barrier, configure_backends, init_process_group, make_runtime, seed_everything
from dast.training.trainer import SignalFlag, StageHooks, StagePlan, StageResult, run_stage

# Keys a resumed run may change (only to larger values) without --force.
GROWABLE = ("train.steps", "self_training.rounds", "self_training.steps")


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def stage(self, name: str) -> Path:
        return self.root / name


def read_manifest(paths: RunPaths) -> dict[str, Any]:
    if not paths.manifest.exists():
        return {"stages": {}}
    try:
        return json.loads(paths.manifest.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{paths.manifest} is damaged; remove it to restart the run's bookkeeping") from exc


def check_resume_config(stored: Config, requested: Config, manifest: dict[str, Any], force: bool) -> None:
    """Refuse a resumed run whose config differs in anything but larger step counts.

    A longer stage 1 is refused once a round has started, and longer rounds once a
    second round has started: the later stages were built on the shorter results.
    """
    diffs = config_diff(stored, requested)
    rounds = [k for k in manifest.get("stages", {}) if re.fullmatch(r"round\d+", k)]
    bad = []
    for key in diffs:
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
            "the run directory was started with a different config: " + "; ".join(bad[:4])
            + ("; ..." if len(bad) > 4 else "") + ". Only larger step counts may change on resume (use --force to override)"
        )


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# Warnings of the data modules (e.g. a sample skipped under ``on_corrupt: skip``) also go to
# the run's log.
DATA_LOGGER = "dast.data"


def setup_logging(run_dir: Path, rt: Runtime) -> logging.Logger:
    log = logging.getLogger(f"dast.run.{run_dir.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    close_logging(log)
    if rt.is_main:
        fh = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(logging.WARNING)
        sh.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(sh)
        for h in (fh, sh):
            logging.getLogger(DATA_LOGGER).addHandler(h)
    return log


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
            raise ConfigError(f"config key '{key}' is {list(size)}: training images need at least "
                              f"{MIN_CORRECTOR_SIDE} pixels on each side for the corrector")


def model_spec_for(cfg: Config) -> ModelSpec:
    from dast.data.labels import table_for
    from dast.models.build import check_output_stride

    table = table_for(cfg.source, cfg.model.num_classes)
    adv = cfg.adversarial
    try:
        check_output_stride(cfg.model.arch, cfg.model.output_stride)
    except ValueError as exc:
        raise ConfigError(f"config key 'model.output_stride': {exc}") from None
    return ModelSpec(
        arch=cfg.model.arch, num_classes=cfg.model.num_classes, variant=cfg.variant, norm=cfg.model.norm,
        input_size=tuple(cfg.target.size) if cfg.target.size else None,
        discoverer=adv.discoverer, corrector=adv.corrector, attention=adv.attention, corrector_width=adv.corrector_width,
        output_stride=cfg.model.output_stride,
        class_names=list(table.names), class_colors=[tuple(c) for c in table.colors],
    )


def initial_networks(cfg: Config, spec: ModelSpec) -> Networks:
    """Fresh networks, with the segmentor (and any stored discriminators) from ``model.init``."""
    nets = build_networks(spec)
    if cfg.model.init:
        tensors, meta = load_checkpoint(cfg.model.init)
        init_spec = meta.get("model", {})
        for key in ("arch", "num_classes"):
            if key in init_spec and init_spec[key] != getattr(spec, key):
                raise UserError(f"model.init {cfg.model.init} is for {key}={init_spec[key]!r}, the config asks for {getattr(spec, key)!r}")
        from dast.models.io import load_state_strict, split_prefixed

        load_state_strict(nets.segmentor, split_prefixed(tensors, "segmentor"), "segmentor", cfg.model.init)
        for name, m in (("discoverer", nets.discoverer), ("corrector", nets.corrector)):
            part = split_prefixed(tensors, name)
            if m is not None and part:
                load_state_strict(m, part, name, cfg.model.init)
    return nets


class Pipeline:
    """Runs (or resumes) a whole training run in ``run_dir``."""

    def __init__(self, cfg: Config, run_dir: Path, rt: Runtime, progress: bool = True) -> None:
        self.cfg, self.paths, self.rt, self.progress = cfg, RunPaths(run_dir), rt, progress
        self.log = setup_logging(run_dir, rt)
        self.writer = None
        if rt.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        self.curves: list[dict[str, Any]] = []
        if rt.is_main:
            _end_torn_line(run_dir / "scalars.jsonl")
        from dast.data.labels import protocols_for

        # SYNTHIA-trained models report 16- and 13-class mIoU on Cityscapes too
        self.protocols = protocols_for(cfg.source.kind) if cfg.source.kind == "synthia" else None

    # ---------------------------------------------------------------- datasets
    def build_data(self) -> None:
        from dast.data.datasets import build_dataset
        from dast.training.selection import build_selection_sets

        cfg = self.cfg
        check_training_sizes(cfg)
        n, norm = cfg.model.num_classes, cfg.model.norm
        self.source = build_dataset(cfg.source, norm=norm, num_classes=n, with_labels=True, seed=cfg.seed)
        self.target = build_dataset(cfg.target, norm=norm, num_classes=n, with_labels=False, seed=cfg.seed + 1)
        self.val = None
        if cfg.val is not None:
            self.val = build_dataset(cfg.val, norm=norm, num_classes=n, with_labels=True, seed=cfg.seed + 2)
        self.selection_sets = []
        if cfg.selection.enabled:
            self.selection_sets = build_selection_sets(
                self.source, self.target, cfg.selection.num_images, cfg.selection.betas, cfg.seed
            )

    # ---------------------------------------------------------------- hooks
    def evaluate(self, nets: Networks, plan: StagePlan | None = None, step: int = 0) -> dict[str, float]:
        from dast.evaluation.evaluate import evaluate_model
        from dast.training.selection import selection_score

        model = nets.target_model()
        scores: dict[str, float] = {}
        if self.selection_sets:
            s = selection_score(model, self.selection_sets, self.rt.device, self.rt.amp_dtype,
                                rank=self.rt.rank, world=self.rt.world_size)
            scores["synthetic"] = s.pop("score")
            scores.update({f"synthetic_{k}": v for k, v in s.items()})
        if self.val is not None:
            idx = list(range(self.rt.rank, len(self.val), self.rt.world_size)) if self.rt.distributed else None
            m = evaluate_model(model, self.val, self.rt.device, amp_dtype=self.rt.amp_dtype, progress=False, indices=idx,
                               distributed=self.rt.distributed, protocols=self.protocols)
            scores["target"] = float(m["miou"])
        return scores

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """TensorBoard scalars, mirrored in RUN/scalars.jsonl for reports and scripts."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.rt.is_main:
            with open(self.paths.root / "scalars.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **scalars}) + "\n")

    def log_images(self, nets: Networks, batch: dict[str, Any], plan: StagePlan, step: int) -> None:
        if self.writer is None:
            return
        from dast.data.transforms import denormalize
        from dast.inference.visualize import colorize, heatmap

        x = batch["image"][:1].to(self.rt.device)
        with torch.no_grad():
            from dast.training.runtime import eval_mode

            with eval_mode(*nets.modules()):
                logits, alpha = nets.target_model()(x)
        size = tuple(x.shape[-2:])
        pred = torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True).argmax(1)[0]
        att = torch.nn.functional.interpolate(alpha.float(), size=size, mode="bilinear", align_corners=True)[0, 0]
        img = denormalize(batch["image"][0], self.cfg.model.norm)
        colors = nets.spec.class_colors
        self.writer.add_image(f"{plan.name}/input", img, step, dataformats="HWC")
        self.writer.add_image(f"{plan.name}/prediction", colorize(pred.cpu().numpy().astype("uint8"), colors), step, dataformats="HWC")
        self.writer.add_image(f"{plan.name}/attention", heatmap(att.clamp(0, 1).cpu().numpy()), step, dataformats="HWC")

    def on_eval(self, history: list[dict[str, Any]]) -> None:
        merged = {(h["stage"], h["step"]): h for h in self.curves}
        for h in history:
            merged[(h["stage"], h["step"])] = h
        self.curves = sorted(merged.values(), key=lambda h: h["global_step"])
        write_json(self.paths.root / "curves.json", self.curves)

    def plot_curves(self) -> None:
        """figure4.png from the evaluation history (at the end of each stage: plotting is slow)."""
        if self.rt.is_main and self.curves:
            from dast.training.plots import plot_selection_curves

            plot_selection_curves(self.curves, self.paths.root / "figure4.png")

    # ---------------------------------------------------------------- stages
    def plans(self) -> list[StagePlan]:
        cfg = self.cfg
        tr, st = cfg.train, cfg.self_training
        has_disc = cfg.adversarial.discoverer or cfg.adversarial.corrector
        mult = float(self.rt.world_size) if cfg.distributed.lr_scaling == "linear" else 1.0
        out = [StagePlan("stage1", 0, tr.steps, tr.poly_steps, tr.lr, float(tr.head_lr_mult), bool(tr.duplicate_params),
                         adversarial=has_disc, lr_mult=mult)]
        offset = tr.steps
        for k in range(1, st.rounds + 1):
            out.append(StagePlan(f"round{k}", k, st.steps, int(st.poly_steps), float(st.lr), float(st.head_lr_mult), False,
                                 adversarial=has_disc and st.adversarial, mu=st.mu,
                                 pseudo_dir=self.paths.stage(f"round{k}") / "pseudo_labels", global_offset=offset,
                                 lr_mult=mult))
            offset += st.steps
        return out

    def portion(self, k: int) -> float:
        st = self.cfg.self_training
        return min(st.portion + (k - 1) * st.portion_step, st.max_portion)

    def run(self, stop: SignalFlag) -> dict[str, Any]:
        cfg, rt = self.cfg, self.rt
        seed_everything(cfg.seed)
        self.build_data()
        spec = model_spec_for(cfg)
        nets = initial_networks(cfg, spec)
        if cfg.model.batchnorm == "per_image":
            from dast.models.batchnorm import use_per_image_batchnorm

            use_per_image_batchnorm(nets.segmentor)
        if cfg.distributed.sync_bn and rt.distributed:
            if rt.device.type != "cuda":
                raise UserError("distributed.sync_bn needs CUDA devices (SyncBatchNorm does not run on CPU)")
            from dast.training.distributed import convert_sync_bn

            convert_sync_bn(nets)
        nets.to(rt.device)
        if rt.compile:
            from dast.training.fast import compile_segmentor

            compile_segmentor(nets.segmentor)
        if rt.channels_last:
            for m in nets.modules():
                m.to(memory_format=torch.channels_last)
        manifest = read_manifest(self.paths)
        if (self.paths.root / "curves.json").exists():
            self.curves = json.loads((self.paths.root / "curves.json").read_text())
        hooks = StageHooks(evaluate=self.evaluate if (self.selection_sets or self.val is not None) else None,
                           log_scalars=self.log_scalars, log_images=self.log_images, on_eval=self.on_eval)
        wrap = None
        if rt.distributed:
            from dast.training.distributed import wrap_for_ddp

            wrap = lambda n: wrap_for_ddp(n, rt, cfg)  # noqa: E731
        previous: Path | None = None
        for plan in self.plans():
            stage_dir = self.paths.stage(plan.name)
            entry = manifest["stages"].get(plan.name, {})
            if entry.get("status") == "complete" and entry.get("steps") == plan.steps and (stage_dir / "selected.safetensors").exists():
                previous = stage_dir / "selected.safetensors"
                continue
            if previous is not None:
                tensors, _ = load_checkpoint(previous)
                assign_weights(nets, tensors, str(previous))
            if plan.pseudo_dir is not None:
                self.make_pseudo_labels(nets, plan)
                from dast.data.datasets import with_label_dir

                target = with_label_dir(self.target, plan.pseudo_dir)
            else:
                target = self.target
            manifest["stages"][plan.name] = {"status": "running", "steps": plan.steps}
            self.write_manifest(manifest)
            result: StageResult = run_stage(cfg, plan, nets, rt, stage_dir, self.source, target, self.log, hooks, stop,
                                            progress=self.progress, wrap=wrap)
            barrier(rt)
            self.plot_curves()
            manifest["stages"][plan.name] = {"status": "complete", "steps": plan.steps,
                                             "selected": str(result.selected.relative_to(self.paths.root))}
            self.write_manifest(manifest)
            previous = result.selected
        return self.finish(nets, previous, manifest)

    def make_pseudo_labels(self, nets: Networks, plan: StagePlan) -> None:
        from dast.training.pseudo_labels import generate_pseudo_labels, pseudo_label_set_complete

        assert plan.pseudo_dir is not None
        if pseudo_label_set_complete(plan.pseudo_dir):
            return
        st = self.cfg.self_training
        idx = list(range(self.rt.rank, len(self.target), self.rt.world_size)) if self.rt.distributed else None
        q = self.portion(plan.index)
        self.log.info("%s: pseudo labels at portion %.2f (%s)", plan.name, q, st.mode)
        stats = generate_pseudo_labels(
            nets.target_model(), self.target, plan.pseudo_dir, portion=q, cap=st.cap, mode=st.mode, bins=st.bins,
            subsample=st.subsample, device=self.rt.device, amp_dtype=self.rt.amp_dtype,
            preview_count=st.preview_count, colors=nets.spec.class_colors, indices=idx, progress=self.progress and self.rt.is_main,
        )
        self.log.info("%s: pseudo labels written (ignored fraction %.3f)", plan.name, stats.get("ignored_fraction", float("nan")))

    def finish(self, nets: Networks, selected: Path | None, manifest: dict[str, Any]) -> dict[str, Any]:
        final = self.paths.stage("final")
        if selected is not None:
            tensors, _ = load_checkpoint(selected)
            assign_weights(nets, tensors, str(selected))
        metrics: dict[str, Any] = {}
        if self.val is not None:
            from dast.evaluation.evaluate import evaluate_model

            idx = list(range(self.rt.rank, len(self.val), self.rt.world_size)) if self.rt.distributed else None
            metrics = evaluate_model(nets.target_model(), self.val, self.rt.device, amp_dtype=self.rt.amp_dtype,
                                     progress=self.progress and self.rt.is_main, indices=idx,
                                     distributed=self.rt.distributed, protocols=self.protocols)
        if self.rt.is_main:
            save_networks(final / "model.safetensors", nets, extra_meta={"stage": "final"})
            if metrics:
                write_json(final / "metrics.json", metrics)
            manifest["status"] = "complete"
            manifest["final"] = {"model": "final/model.safetensors", "metrics": "final/metrics.json" if metrics else None}
            self.write_manifest(manifest)
            if self.writer is not None:
                self.writer.flush()
                self.writer.close()
        return metrics

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        if self.rt.is_main:
            write_json(self.paths.manifest, manifest)

    def close(self) -> None:
        """Close the TensorBoard writer and the log files (idempotent)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        close_logging(self.log)


def _end_torn_line(path: Path) -> None:
    """Terminate a last line left without its newline by a killed writer."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, 2)
        if fh.read(1) != b"\n":
            fh.write(b"\n")


def has_progress(run_dir: Path) -> bool:
    """Whether a run directory holds trained weights worth keeping."""
    return (any(run_dir.glob("*/checkpoints/step_*.safetensors")) or any(run_dir.glob("*/selected.safetensors"))
            or (run_dir / "final").exists())


def _discard_new_run(run_dir: Path, created: Path | None) -> None:
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
    paths = RunPaths(run_dir)
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
        for d in run_dir.glob("round*"):
            if d.is_dir():
                manifest.setdefault("stages", {}).setdefault(d.name, {"status": "started"})
        check_resume_config(stored, cfg, manifest, force)
        return cfg
    if cfg is None:
        raise UserError("--config is required unless --resume names an existing run directory")
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise UserError(f"run directory {run_dir} already exists and is not empty (use --resume to continue it, or --force)")
    return cfg


def train(cfg: Config | None, run_dir: str | Path, *, resume: bool = False, force: bool = False,
          device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a run; returns the final metrics (empty without a labelled val set)."""
    run_dir = Path(run_dir)
    cfg = prepare_run_dir(run_dir, cfg, resume, force)
    rt = make_runtime(cfg.runtime, device)
    init_process_group(rt)
    configure_backends(rt)
    fresh = not resume and not (run_dir.exists() and any(run_dir.iterdir()))
    created = _first_missing(run_dir)
    if rt.is_main:
        remove_stale_temps(run_dir)  # half-written files of a killed run (checkpoints, final/, curves)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(RunPaths(run_dir).config, to_yaml(cfg))
    barrier(rt)
    pipe = Pipeline(cfg, run_dir, rt, progress=progress)
    try:
        with SignalFlag() as stop:
            return pipe.run(stop)
    except UserError:
        # bad input found before anything was trained: leave no half-made run directory
        pipe.close()
        if fresh and rt.is_main and not has_progress(run_dir):
            _discard_new_run(run_dir, created)
        raise
    finally:
        pipe.close()


def _first_missing(path: Path) -> Path | None:
    """The outermost missing folder on the way to ``path`` (None when ``path`` exists)."""
    missing = None
    p = path.absolute()
    while not p.exists() and p != p.parent:
        missing, p = p, p.parent
    return missing
