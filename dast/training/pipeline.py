"""The whole DAST method in one call: stage 1 -> selection -> K self-training rounds ->
final evaluation, each stage resumable, all outputs in one run directory (its layout is
:mod:`dast.rundir`).

Crash safety, resume and the config-change policy are described in docs/reliability.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from dast.atomic import remove_stale_temps, write_json, write_text
from dast.checkpoint import load_checkpoint
from dast.config import Config, to_yaml
from dast.contexts import eval_mode
from dast.data.datasets import build_dataset, with_label_dir
from dast.data.labels import protocols_for
from dast.data.transforms import denormalize
from dast.errors import UserError
from dast.evaluation.evaluate import evaluate_model
from dast.execution import Execution
from dast.inference.visualize import colorize, heatmap
from dast.models.batchnorm import use_per_image_batchnorm
from dast.models.io import Networks, assign_weights, save_networks
from dast.models.target_model import predict_full_res
from dast.parallel import shard
from dast.rundir import RunDir
from dast.training.distributed import convert_sync_bn, wrap_for_ddp
from dast.training.hooks import HookInputs
from dast.training.levers import compile_segmentor, to_channels_last
from dast.training.loop import SignalFlag, StageResult, StageRun, run_stage
from dast.training.peers import broadcast_object
from dast.training.plans import StagePlan, stage_plans
from dast.training.plots import plot_selection_curves
from dast.training.pseudo_labels import generate_pseudo_labels, pseudo_label_set_complete
from dast.training.runtime import (
    Runtime,
    barrier,
    configure_backends,
    seed_everything,
)
from dast.training.selection import build_selection_sets, selection_score
from dast.training.session import record_world_size, run_session
from dast.training.setup import (
    check_training_sizes,
    close_logging,
    discard_new_run,
    end_torn_line,
    first_missing,
    initial_networks,
    model_spec_for,
    read_manifest,
    run_header_lines,
    setup_logging,
)
from dast.training.snapshots import best_across_stages
from dast.training.step import StepModels


class Pipeline:
    """Runs (or resumes) a whole training run in ``run_dir``."""

    def __init__(
        self, cfg: Config, run_dir: Path, rt: Runtime, progress: bool = True, heartbeat: str | None = None
    ) -> None:
        self.cfg, self.paths, self.rt, self.progress = cfg, RunDir(run_dir), rt, progress
        self.heartbeat = heartbeat
        self.log = setup_logging(run_dir, rt)
        self.writer = None
        if rt.is_main:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - heavy: tensorboard, only where logs are written

            self.writer = SummaryWriter(str(self.paths.tensorboard))
            end_torn_line(self.paths.scalars)
        self.curves: list[dict[str, Any]] = []
        # SYNTHIA-trained models report 16- and 13-class mIoU on Cityscapes too
        self.protocols = protocols_for(cfg.source.kind) if cfg.source.kind == "synthia" else None

    # ---------------------------------------------------------------- datasets
    def build_data(self) -> None:
        cfg = self.cfg
        check_training_sizes(cfg)
        n, norm = cfg.model.num_classes, cfg.model.norm
        self.source = build_dataset(cfg.source, norm=norm, num_classes=n, with_labels=True, seed=cfg.seed)
        self.target = build_dataset(cfg.target, norm=norm, num_classes=n, with_labels=False, seed=cfg.seed + 1)
        self.val = None
        if cfg.val is not None:
            self.val = build_dataset(cfg.val, norm=norm, num_classes=n, with_labels=True, seed=cfg.seed + 2)
        sets = {"source": self.source, "target": self.target, "val": self.val}
        for line in run_header_lines(cfg, self.rt, {k: len(v) for k, v in sets.items() if v is not None}):
            self.log.info(line)
        self.selection_sets = []
        if cfg.selection.enabled:
            self.selection_sets = build_selection_sets(
                self.source, self.target, cfg.selection.num_images, cfg.selection.betas, cfg.seed
            )

    # ---------------------------------------------------------------- callbacks of the stage loop
    @property
    def _shows_progress(self) -> bool:
        return self.progress and self.rt.is_main

    def evaluate(self, nets: Networks, plan: StagePlan | None = None, step: int = 0) -> dict[str, float]:
        """The label-free selection score (``synthetic``) and, with a labelled val set, ``target``."""
        rt = self.rt
        model = nets.target_model()
        scores: dict[str, float] = {}
        if self.selection_sets:
            s = selection_score(model, self.selection_sets, self.execution(), rank=rt.rank, world=rt.world_size)
            scores["synthetic"] = s.pop("score")
            scores.update({f"synthetic_{k}": v for k, v in s.items()})
        if self.val is not None:
            scores["target"] = float(self.evaluate_val(model, "evaluating target val")["miou"])
        return scores

    def evaluate_val(self, model: nn.Module, desc: str) -> dict[str, Any]:
        """The metrics of ``model`` on the labelled val set (every rank its shard, all the union)."""
        assert self.val is not None
        rt = self.rt
        return evaluate_model(
            model,
            self.val,
            self.execution(shard(len(self.val), rt.rank, rt.world_size)),
            distributed=rt.distributed,
            protocols=self.protocols,
            desc=desc,
        )

    def execution(self, indices: list[int] | None = None) -> Execution:
        """How this process runs a pass over a dataset (its shard: ``indices``)."""
        rt = self.rt
        return Execution(device=rt.device, amp_dtype=rt.amp_dtype, indices=indices, progress=self._shows_progress)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """TensorBoard scalars, mirrored in RUN/scalars.jsonl for reports and scripts."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.rt.is_main:
            with open(self.paths.scalars, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **scalars}) + "\n")

    def log_images(self, nets: Networks, batch: dict[str, Any], plan: StagePlan, step: int) -> None:
        if self.writer is None:
            return
        x = batch["image"][:1].to(self.rt.device)
        with eval_mode(*nets.modules()):
            logits, alpha = predict_full_res(nets.target_model(), x)
        pred = logits.argmax(1)[0]
        img = denormalize(batch["image"][0], self.cfg.model.norm)
        colors = nets.spec.class_colors
        self.writer.add_image(f"{plan.name}/input", img, step, dataformats="HWC")
        self.writer.add_image(
            f"{plan.name}/prediction", colorize(pred.cpu().numpy().astype("uint8"), colors), step, dataformats="HWC"
        )
        self.writer.add_image(
            f"{plan.name}/attention", heatmap(alpha[0, 0].clamp(0, 1).cpu().numpy()), step, dataformats="HWC"
        )

    def on_eval(self, history: list[dict[str, Any]]) -> None:
        merged = {(h["stage"], h["step"]): h for h in self.curves}
        for h in history:
            merged[(h["stage"], h["step"])] = h
        self.curves = sorted(merged.values(), key=lambda h: h["global_step"])
        write_json(self.paths.curves, self.curves)

    def plot_curves(self) -> None:
        """figure4.png from the evaluation history (at the end of each stage: plotting is slow)."""
        if self.rt.is_main and self.curves:
            plot_selection_curves(self.curves, self.paths.figure4)

    # ---------------------------------------------------------------- stages
    def plans(self) -> list[StagePlan]:
        return stage_plans(self.cfg, self.rt.world_size)

    def portion(self, k: int) -> float:
        st = self.cfg.self_training
        return min(st.portion + (k - 1) * st.portion_step, st.max_portion)

    def prepare_networks(self) -> Networks:
        """The initial networks on the device, with the runtime's BatchNorm, memory format
        and compilation."""
        cfg, rt = self.cfg, self.rt
        nets = initial_networks(cfg, model_spec_for(cfg), self.log)
        if cfg.model.batchnorm == "per_image":
            use_per_image_batchnorm(nets.segmentor)
        if cfg.distributed.sync_bn and rt.distributed:
            if rt.device.type != "cuda":
                raise UserError("distributed.sync_bn needs CUDA devices (SyncBatchNorm does not run on CPU)")

            convert_sync_bn(nets)
        nets.to(rt.device)
        if rt.compile:
            compile_segmentor(nets.segmentor)
        if rt.channels_last:
            to_channels_last(*nets.modules())
        return nets

    def _ddp_wrap(self) -> Callable[[Networks], StepModels] | None:
        if not self.rt.distributed:
            return None

        cfg, rt = self.cfg, self.rt
        return lambda n: wrap_for_ddp(n, rt, cfg)

    def run(self, stop: SignalFlag) -> dict[str, Any]:
        seed_everything(self.cfg.seed)
        self.build_data()
        nets = self.prepare_networks()
        manifest = broadcast_object(read_manifest(self.paths) if self.rt.is_main else None, self.rt)  # rank 0 decides
        if self.paths.curves.exists():
            self.curves = json.loads(self.paths.curves.read_text())
        inputs = HookInputs(
            evaluate=self.evaluate if (self.selection_sets or self.val is not None) else None,
            log_scalars=self.log_scalars,
            log_images=self.log_images,
            on_eval=self.on_eval,
            progress=self.progress,
            heartbeat=self.heartbeat,
        )
        wrap = self._ddp_wrap()
        previous: Path | None = None
        for plan in self.plans():
            stage = self.paths.stage(plan.name)
            entry = manifest["stages"].get(plan.name, {})
            if entry.get("status") == "complete" and entry.get("steps") == plan.steps and stage.selected.exists():
                previous = stage.selected
                continue
            if previous is not None:
                tensors, _ = load_checkpoint(previous)
                assign_weights(nets, tensors, str(previous))
            target = self.target
            if plan.pseudo_labels:
                self.make_pseudo_labels(nets, plan, stage.pseudo_labels)
                target = with_label_dir(self.target, stage.pseudo_labels)
            manifest["stages"][plan.name] = {"status": "running", "steps": plan.steps}
            self.write_manifest(manifest)
            run = StageRun(self.source, target, self.log, stop, inputs, wrap)
            result: StageResult = run_stage(self.cfg, plan, nets, self.rt, stage.root, run)
            barrier(self.rt)
            self.plot_curves()
            manifest["stages"][plan.name] = {
                "status": "complete",
                "steps": plan.steps,
                "selected": str(result.selected.relative_to(self.paths.root)),
            }
            self.write_manifest(manifest)
            previous = result.selected
        return self.finish(nets, self.final_choice(previous), manifest)

    def make_pseudo_labels(self, nets: Networks, plan: StagePlan, out: Path) -> None:
        if pseudo_label_set_complete(out):
            return
        st = self.cfg.self_training.model_copy(update={"portion": self.portion(plan.index)})
        self.log.info("%s: pseudo labels at portion %.2f (%s)", plan.name, st.portion, st.estimator)
        execution = self.execution(shard(len(self.target), self.rt.rank, self.rt.world_size))
        stats = generate_pseudo_labels(
            nets.target_model(), self.target, out, st, execution=execution, colors=nets.spec.class_colors
        )
        self.log.info(
            "%s: pseudo labels written (ignored fraction %.3f)", plan.name, stats.get("ignored_fraction", float("nan"))
        )

    def final_choice(self, last: Path | None) -> Path | None:
        """The model the run ends with: the last stage's selected snapshot, or, with
        ``selection.across_stages``, the selected snapshot with the best score of all stages."""
        if last is None or not self.cfg.selection.across_stages:
            return last
        best = best_across_stages(self.paths)
        if best is None:
            return last
        path, name, value = best
        self.log.info(
            "final model: the selected snapshot of %s (selection score %.2f, best across stages)", name, value
        )
        return path

    def finish(self, nets: Networks, selected: Path | None, manifest: dict[str, Any]) -> dict[str, Any]:
        if selected is not None:
            tensors, _ = load_checkpoint(selected)
            assign_weights(nets, tensors, str(selected))
        metrics: dict[str, Any] = {}
        if self.val is not None:
            metrics = self.evaluate_val(nets.target_model(), "final evaluation")
        if self.rt.is_main:
            source = str(selected.relative_to(self.paths.root)) if selected is not None else None
            save_networks(self.paths.final_model, nets, extra_meta={"stage": "final", "from": source})
            if metrics:
                write_json(self.paths.final_metrics, metrics)
            manifest["status"] = "complete"
            root = self.paths.root
            manifest["final"] = {
                "model": str(self.paths.final_model.relative_to(root)),
                "from": source,
                "metrics": str(self.paths.final_metrics.relative_to(root)) if metrics else None,
            }
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


def train(
    cfg: Config | None,
    run_dir: str | Path,
    *,
    resume: bool | str = False,
    force: bool = False,
    device: str | None = None,
    progress: bool = True,
    heartbeat: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run; returns the final metrics (empty without a labelled val set).
    ``resume``: False, True or ``"auto"`` (:mod:`dast.training.session`).
    ``heartbeat``: a name under which to print a progress line now and then (no bar)."""
    run_dir = Path(run_dir)
    return run_session(
        cfg,
        run_dir,
        resume=resume,
        force=force,
        device=device,
        body=lambda s: _train_in_group(s.cfg, run_dir, s.rt, s.resume, progress, heartbeat),
    )


def _train_in_group(
    cfg: Config, run_dir: Path, rt: Runtime, resume: bool, progress: bool, heartbeat: str | None
) -> dict[str, Any]:
    configure_backends(rt)
    fresh = not resume and not (run_dir.exists() and any(run_dir.iterdir()))
    created = first_missing(run_dir)
    if rt.is_main:
        remove_stale_temps(run_dir)  # half-written files of a killed run (checkpoints, final/, curves)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(RunDir(run_dir).config, to_yaml(cfg))
        record_world_size(RunDir(run_dir), rt.world_size)
    barrier(rt)
    pipe = Pipeline(cfg, run_dir, rt, progress=progress, heartbeat=heartbeat)
    try:
        with SignalFlag() as stop:
            return pipe.run(stop)
    except UserError:
        # bad input found before anything was trained: leave no half-made run directory
        pipe.close()
        if fresh and rt.is_main and not RunDir(run_dir).has_progress():
            discard_new_run(run_dir, created)
        raise
    finally:
        pipe.close()
