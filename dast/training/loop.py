"""The training loop of one stage (stage 1, or one self-training round).

The loop only orders things: resume from the latest checkpoint (:meth:`StageLoop.restore`,
which a rollback uses too), then for each iteration the hooks' ``before_step``,
``engine.step`` and the hooks' ``after_step`` (:mod:`dast.training.hooks`), then their
``after_stage``. It owns the checkpoint format's use (:meth:`StageLoop.save`): the
networks, the engine's state, every hook's state and the RNG. The stage's files are laid
out as :class:`dast.rundir.StageDir` says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Sampler

from dast.atomic import remove_stale_temps
from dast.config import Config
from dast.data.workers import close_loader_iterator, worker_init
from dast.models.io import Networks, assign_weights
from dast.rundir import RunDir, StageDir
from dast.training.engine import Engine
from dast.training.hooks import Hook, HookInputs, StageState, StageView, default_hooks
from dast.training.online.recipe import online_parts
from dast.training.online.sampling import RareClassCrops, RareClassSampler, cached_class_pixels, rcs_plan
from dast.training.peers import agreed_latest_checkpoint
from dast.training.plans import StagePlan
from dast.training.runtime import Runtime, barrier
from dast.training.sampler import StepSampler
from dast.training.signals import SignalFlag, TrainingInterrupted
from dast.training.snapshots import prune_best_files
from dast.training.state import load_training_state, rng_from_flat, save_training_state
from dast.training.step import StepModels

__all__ = ["SignalFlag", "StageData", "StageLoop", "StageResult", "StageRun", "TrainingInterrupted", "run_stage"]


@dataclass
class StageResult:
    selected: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    steps_done: int = 0


class StageData:
    """The source and (when the stage reads it) target batches, resumable at any step.

    With ``source.rare_class_sampling`` the source images are drawn by class rarity
    (:mod:`dast.training.online.sampling`; its class statistics are cached beside the dataset
    or, for generated and read-only datasets, in ``cache_dir``)."""

    def __init__(
        self,
        cfg: Config,
        plan: StagePlan,
        runtime: Runtime,
        source: Any,
        target: Any | None,
        cache_dir: Path | None = None,
    ) -> None:
        self.cfg, self.plan, self.runtime, self.source, self.target = cfg, plan, runtime, source, target
        self.cache_dir = cache_dir
        self.iters: list[Iterator[dict[str, Any]] | None] = [None, None]

    def _rare_class_source(self, seed: int, start: int) -> tuple[Any, Sampler[int]]:
        """The source read through rare-class sampling: rank 0 counts (and caches) the class
        pixels first, the other ranks then read its cache."""
        rcs, rt = self.cfg.source.rare_class_sampling, self.runtime
        assert rcs is not None
        if rt.is_main:
            pixels = cached_class_pixels(self.source, self.cfg.source.root, self.cache_dir)
        barrier(rt)
        if not rt.is_main:
            pixels = cached_class_pixels(self.source, self.cfg.source.root, self.cache_dir, show_progress=False)
        plan = rcs_plan(pixels, rcs.temperature, rcs.min_pixels)
        layout = StepSampler(plan.num_images, self.cfg.train.batch_size, seed, start, rt.rank, rt.world_size)
        sampler = RareClassSampler(plan, layout)
        return RareClassCrops(self.source, rcs.min_pixels, rcs.min_crop_ratio), sampler

    def _loader(self, ds: Any, seed: int, start: int) -> Iterator[dict[str, Any]]:
        tr, rt = self.cfg.train, self.runtime
        sampler: Sampler[int]
        if ds is self.source and self.cfg.source.rare_class_sampling is not None:
            ds, sampler = self._rare_class_source(seed, start)
        else:
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

    @property
    def is_open(self) -> bool:
        return self.iters[0] is not None

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


@dataclass(kw_only=True)
class StageLoop(StageView):
    """One stage's loop: the :class:`~dast.training.hooks.StageView` its hooks see, plus its
    data and its hooks."""

    data: StageData
    hooks: list[Hook]
    resumed: bool = False
    _rewound: bool = False

    def __post_init__(self) -> None:
        names = [h.name for h in self.hooks if h.name]
        if len(names) != len(set(names)):
            raise ValueError(f"two hooks keep their state under one name: {names}")

    def run(self) -> StageResult:
        self.resume()
        start, t0 = self.state.step, time.time()
        self.engine.train_modes(self.nets.modules())
        self.data.open(start)
        try:
            for hook in self.hooks:
                hook.before_stage(self)
            while self.state.step < self.plan.steps:
                self.iterate()
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self.data.close()  # even when an exception leaves the loop
        if not self.resumed or start < self.plan.steps:
            self.log.info("%s: %d steps in %.1f s", self.plan.name, self.plan.steps - start, time.time() - t0)
        for hook in self.hooks:
            hook.after_stage(self)
        return StageResult(selected=self.stage.selected, history=self.state.history, steps_done=self.plan.steps)

    def iterate(self) -> None:
        """One iteration: the hooks' ``before_step``, the engine's step, their ``after_step``."""
        self.current, self._rewound = self.data.next(), False
        for hook in self.hooks:
            hook.before_step(self)
        result = self.engine.step(self.state.step, self.engine.prepare(*self.current))
        self.state.step += 1  # a skipped step still counts: its evaluation and checkpoint follow
        self.runtime.progress.reached(self.plan.name, self.state.step)  # for the other ranks' watch
        for hook in self.hooks:
            hook.after_step(self, result)
            if self._rewound:  # a hook restored an earlier checkpoint: this iteration is undone
                return

    def _fail(self, exc: BaseException) -> None:
        """Every hook's ``on_failure``, even when one of them raises."""
        for hook in self.hooks:
            try:
                hook.on_failure(self, exc)
            except Exception:
                self.log.exception("%s: %s.on_failure failed", self.plan.name, type(hook).__name__)

    def resume(self) -> None:
        """Continue from the stage's latest checkpoint, if it has one (clearing torn files first)."""
        if self.runtime.is_main:  # only rank 0 writes the run directory
            self.stage.checkpoints.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.stage.root)
        latest = agreed_latest_checkpoint(self.stage, self.runtime)
        self.resumed = latest is not None
        if latest is not None:
            self.restore(latest)
            self.log.info("%s: resuming from %s (step %d)", self.plan.name, latest.name, self.state.step)

    def save(self, step: int) -> None:
        """Write the full training state as the checkpoint of ``step`` (rank 0 only)."""
        if not self.runtime.is_main:
            return
        st = self.state
        meta = {
            "stage_state": {"stage": self.plan.name, "step": step, "history": st.history, "best": st.best},
            "config": self.cfg.model_dump(mode="json"),
        }
        hooks = {h.name: h.state_dict() for h in self.hooks if h.name}
        save_training_state(self.stage.checkpoint(step), self.nets, self.engine.state_dict(), hooks, meta)

    def restore(self, path: Path) -> None:
        """Load checkpoint ``path``: weights, engine, hooks, RNG and stage state; the data
        restarts at its step (resume, and the fault policy's rollback)."""
        ckpt = load_training_state(path)
        assign_weights(self.nets, ckpt.tensors, str(path))
        self.engine.load_state_dict(ckpt.engine)
        for hook in self.hooks:
            if hook.name:
                hook.load_state_dict(ckpt.hooks.get(hook.name, {}))
        rng_from_flat(ckpt.tensors, ckpt.meta.get("rng", {}))
        st = ckpt.meta["stage_state"]
        self.state = StageState(int(st["step"]), list(st["history"]), st["best"])
        if self.runtime.is_main:
            prune_best_files(self.stage, self.state.best)  # those of an abandoned path
        if self.data.is_open:
            self.data.restart(self.state.step)
        self._rewound = True


@dataclass(frozen=True)
class StageRun:
    """What the pipeline gives one stage besides its config, plan and networks: the data,
    the log, the stop flag, the hooks' callbacks, the DDP wrapping and extra hooks (see
    :func:`~dast.training.hooks.default_hooks` for where they run)."""

    source: Any
    target: Any | None
    log: logging.Logger
    stop: SignalFlag
    inputs: HookInputs = HookInputs()
    wrap: Callable[[Networks], StepModels] | None = None
    extra_hooks: tuple[Hook, ...] = ()


def run_stage(cfg: Config, plan: StagePlan, nets: Networks, rt: Runtime, stage_dir: Path, run: StageRun) -> StageResult:
    """Train one stage to ``plan.steps`` (resuming from its latest checkpoint), then write
    ``selected.safetensors``."""
    extra_hooks = list(run.extra_hooks)
    recipe = None
    if plan.kind == "online":
        recipe, teacher = online_parts(cfg, nets, rt.autocast, rt.rank, run.log)
        extra_hooks.insert(0, teacher)
    engine = Engine.build(plan, cfg, nets, rt, wrap=run.wrap, log=run.log, extra=recipe)
    s = engine.ctx.settings
    reads_target = plan.adversarial or s.attention or plan.pseudo_labels or s.forward_target or recipe is not None
    loop = StageLoop(
        cfg=cfg,
        plan=plan,
        nets=nets,
        runtime=rt,
        engine=engine,
        stage=StageDir(stage_dir),
        log=run.log,
        stop=run.stop,
        run_digests=RunDir(stage_dir.parent).digests(rt.rank),
        data=StageData(cfg, plan, rt, run.source, run.target if reads_target else None, stage_dir.parent),
        hooks=default_hooks(cfg, plan, run.inputs, extra_hooks),
    )
    return loop.run()
