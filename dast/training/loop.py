"""The training loop of one stage (stage 1, or one self-training round).

The loop only orders things: resume, then for each iteration ``engine.step`` and the
hooks (:mod:`dast.training.hooks`), then the stage's last checkpoint and its selected
model. The stage's files are laid out as :class:`dast.rundir.StageDir` says.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from dast.config import Config
from dast.data.workers import close_loader_iterator, worker_init
from dast.models.io import Networks
from dast.rundir import RunDir, StageDir
from dast.training.engine import Engine, StagePlan
from dast.training.hooks import CheckpointHook, EvalHook, FaultHook, Hook, LogHook, StageState
from dast.training.runtime import Runtime
from dast.training.sampler import StepSampler
from dast.training.step import StepModels


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved."""

    def __init__(self, signum: int, stage: str, step: int) -> None:
        self.signum, self.stage, self.step = signum, stage, step
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received at {stage} step {step}: checkpoint saved; continue with `dast train --resume`"
        )


class SignalFlag:
    """Records SIGTERM/SIGINT instead of dying, so the loop can save and stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class StageCallbacks:
    """What the pipeline provides to the loop (all optional)."""

    evaluate: Callable[[Networks, StagePlan, int], dict[str, float]] | None = None
    log_scalars: Callable[[dict[str, float], int], None] | None = None
    log_images: Callable[[Networks, dict[str, Any], StagePlan, int], None] | None = None
    on_eval: Callable[[list[dict[str, Any]]], None] | None = None


@dataclass
class StageResult:
    selected: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    steps_done: int = 0


class StageData:
    """The source and (when the stage reads it) target batches, resumable at any step."""

    def __init__(self, cfg: Config, plan: StagePlan, runtime: Runtime, source: Any, target: Any | None) -> None:
        self.cfg, self.plan, self.runtime, self.source, self.target = cfg, plan, runtime, source, target
        self.iters: list[Iterator[dict[str, Any]] | None] = [None, None]

    def _loader(self, ds: Any, seed: int, start: int) -> Iterator[dict[str, Any]]:
        tr, rt = self.cfg.train, self.runtime
        sampler = StepSampler(len(ds), tr.batch_size, seed, start, rt.rank, rt.world_size)
        return iter(
            DataLoader(
                ds,
                batch_size=tr.batch_size,
                sampler=sampler,
                num_workers=tr.num_workers,
                drop_last=True,
                pin_memory=rt.device.type == "cuda",
                persistent_workers=False,
                worker_init_fn=worker_init(tr.num_workers),
            )
        )

    def open(self, step: int) -> None:
        """Start both loaders at ``step`` (the data order depends only on seed and step)."""
        base = self.cfg.seed * 10 + 2 * self.plan.index
        self.iters[0] = self._loader(self.source, base, step)
        if self.target is not None:
            try:
                self.iters[1] = self._loader(self.target, base + 1, step)
            except BaseException:
                self.close()
                raise

    def next(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        src, tgt = self.iters
        assert src is not None
        return next(src), (next(tgt) if tgt is not None else None)

    def restart(self, step: int) -> None:
        self.close()
        self.open(step)

    def close(self) -> None:
        for i, it in enumerate(self.iters):
            close_loader_iterator(it)
            self.iters[i] = None


@dataclass
class StageLoop:
    """One stage's loop and everything its hooks may read or change."""

    cfg: Config
    plan: StagePlan
    nets: Networks
    runtime: Runtime
    engine: Engine
    stage: StageDir
    data: StageData
    log: logging.Logger
    stop: SignalFlag
    checkpoints: CheckpointHook
    logger: LogHook
    faults: FaultHook
    evaluator: EvalHook
    run_digests: Path
    state: StageState = field(default_factory=StageState)
    resumed: bool = False

    @property
    def hooks(self) -> list[Hook]:
        """In the order they run after a step."""
        return [self.logger, self.evaluator, self.checkpoints]

    def run(self) -> StageResult:
        self.checkpoints.before_stage(self)  # resume from the latest checkpoint
        start, t0 = self.state.step, time.time()
        self.engine.train_modes(self.nets.modules())
        self.data.open(start)
        for h in (self.logger, self.faults):
            h.before_stage(self)
        try:
            while self.state.step < self.plan.steps:
                if self.stop.signum is not None:
                    self.checkpoints.save(self, self.state.step)
                    raise TrainingInterrupted(self.stop.signum, self.plan.name, self.state.step)
                source, target = self.data.next()
                self.faults.before_step()
                result = self.engine.step(self.state.step, *self.engine.prepare(source, target))
                if self.faults.after_result(self, result, source, target):
                    continue  # rolled back: the restored step runs again
                self.state.step += 1  # a skipped step still counts: its evaluation and checkpoint follow
                for hook in self.hooks:
                    hook.after_step(self, result, source, target)
        finally:
            self.data.close()  # even when an exception leaves the loop
            self.logger.close(self)
        if not self.resumed or start < self.plan.steps:
            self.log.info("%s: %d steps in %.1f s", self.plan.name, self.plan.steps - start, time.time() - t0)
        self.checkpoints.after_stage(self)
        self.evaluator.after_stage(self)
        return StageResult(selected=self.stage.selected, history=self.state.history, steps_done=self.plan.steps)


def selection_key(cfg: Config) -> str | None:
    """The score that picks a stage's best snapshot, or None."""
    if cfg.selection.select_on == "synthetic" and cfg.selection.enabled:
        return "synthetic"
    if cfg.selection.select_on == "target":
        return "target"
    return None


def run_stage(
    cfg: Config,
    plan: StagePlan,
    nets: Networks,
    rt: Runtime,
    stage_dir: Path,
    source_ds: Any,
    target_ds: Any,
    log: logging.Logger,
    callbacks: StageCallbacks,
    stop: SignalFlag,
    progress: bool = True,
    wrap: Callable[[Networks], StepModels] | None = None,
    heartbeat: str | None = None,
) -> StageResult:
    """Train one stage to ``plan.steps`` (resuming from its latest checkpoint), then write
    ``selected.safetensors``."""
    engine = Engine.build(plan, cfg, nets, rt, wrap=wrap, log=log)
    tr, s = cfg.train, engine.settings
    reads_target = plan.adversarial or s.attention or plan.pseudo_dir is not None or s.forward_target
    loop = StageLoop(
        cfg,
        plan,
        nets,
        rt,
        engine,
        StageDir(stage_dir),
        StageData(cfg, plan, rt, source_ds, target_ds if reads_target else None),
        log,
        stop,
        checkpoints=CheckpointHook(tr.checkpoint_every, tr.keep_last),
        logger=LogHook(
            tr.log_every,
            tr.image_every,
            tr.digest_every,
            progress,
            callbacks.log_scalars,
            callbacks.log_images,
            heartbeat=heartbeat,
        ),
        faults=FaultHook(cfg.faults.policy, cfg.faults.max_consecutive, cfg.faults.lr_factor),
        evaluator=EvalHook(
            callbacks.evaluate,
            plan.eval_every or tr.eval_every,
            selection_key(cfg),
            cfg.selection.select_on,
            callbacks.log_scalars,
            callbacks.on_eval,
        ),
        run_digests=RunDir(stage_dir.parent).digests(rt.rank),
    )
    return loop.run()
