"""What happens around each iteration of a stage, one job per hook.

The loop (:class:`dast.training.loop.StageLoop`) holds a plain ``list[Hook]`` and calls
every hook at each moment, in list order:

* ``before_stage`` — after a resume, before the first iteration;
* ``before_step`` — before each iteration (``loop.current`` holds its raw batch);
* ``after_step`` — after each iteration, applied or skipped; a hook that rolls back
  (``loop.restore``) ends the iteration: the hooks after it do not run for it;
* ``after_stage`` — after the last iteration;
* ``on_failure`` — when the stage fails or is interrupted (every hook's, even when one of
  them raises);
* ``state_dict`` / ``load_state_dict`` — what a checkpoint keeps of the hook (tensors and
  JSON values; a hook with an empty ``name`` keeps nothing).

Hooks see the loop through :class:`StageView` and never import the loop.

* :class:`FaultHook`: the non-finite-loss policy (skip, or roll back to the last checkpoint).
* :class:`LogHook`: progress bar, scalars (log, TensorBoard, ``scalars.jsonl``), images, digests, heartbeat.
* :class:`EvalHook`: evaluation history, best snapshot, final selection.
* :class:`CheckpointHook`: full-state checkpoints, pruning, and the save-and-stop on SIGTERM.

:func:`default_hooks` builds the list of a stage.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dast.config import Config
from dast.contexts import eval_mode
from dast.errors import NumericalFault
from dast.models.io import Networks
from dast.rundir import StageDir
from dast.training.engine import Engine, StepResult
from dast.training.peers import agreed_latest_checkpoint, agreed_stop_signal
from dast.training.plans import StagePlan
from dast.training.runtime import Runtime, barrier
from dast.training.signals import SignalFlag, TrainingInterrupted
from dast.training.snapshots import prune_best_files, save_best, write_selected

Scalars = dict[str, float]
Batch = dict[str, Any]


@dataclass
class StageState:
    """What a checkpoint of a stage records besides weights, engine, hooks and RNG."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


@dataclass
class StageView:
    """What a hook may read or call of the running stage (the loop, :class:`dast.training.loop.StageLoop`,
    is one): its config, plan, networks, runtime, engine, folder, log, stop flag, state and
    the raw (source, target) batch of the running iteration."""

    cfg: Config
    plan: StagePlan
    nets: Networks
    runtime: Runtime
    engine: Engine
    stage: StageDir
    log: logging.Logger
    stop: SignalFlag
    run_digests: Path
    state: StageState = field(default_factory=StageState)
    current: tuple[Batch, Batch | None] | None = None

    def save(self, step: int) -> None:
        """Write the full training state as the checkpoint of ``step`` (rank 0)."""
        raise NotImplementedError

    def restore(self, path: Path) -> None:
        """Load a checkpoint: weights, engine, hooks, RNG, stage state; data from its step."""
        raise NotImplementedError


class Hook:
    """The interface; every method is optional. ``name``: the key of the hook's state in
    checkpoints (empty: the hook keeps nothing)."""

    name = ""

    def before_stage(self, loop: StageView) -> None:
        pass

    def before_step(self, loop: StageView) -> None:
        pass

    def after_step(self, loop: StageView, result: StepResult) -> None:
        pass

    def after_stage(self, loop: StageView) -> None:
        pass

    def on_failure(self, loop: StageView, exc: BaseException) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


class CheckpointHook(Hook):
    """Saves the full training state every ``every`` steps and at the end, keeps the last
    ``keep_last``, and on SIGTERM/SIGINT saves and stops the stage (:class:`TrainingInterrupted`)."""

    def __init__(self, every: int, keep_last: int) -> None:
        self.every, self.keep_last = every, keep_last

    def save(self, loop: StageView, step: int) -> None:
        loop.save(step)
        if loop.runtime.is_main:
            for _, old in loop.stage.checkpoint_files()[: -self.keep_last]:
                old.unlink(missing_ok=True)
            prune_best_files(loop.stage, loop.state.best)  # superseded now that a checkpoint records `best`
        barrier(loop.runtime)  # only rank 0 writes; the others go on once it has

    def before_step(self, loop: StageView) -> None:
        signum = agreed_stop_signal(loop.stop.signum, loop.runtime)  # every rank stops after the same step
        if signum is not None:
            self.save(loop, loop.state.step)
            raise TrainingInterrupted(signum, loop.plan.name, loop.state.step)

    def after_step(self, loop: StageView, result: StepResult) -> None:
        if _due(loop.state.step, self.every, loop.plan.steps):
            self.save(loop, loop.state.step)

    def after_stage(self, loop: StageView) -> None:
        found = loop.stage.checkpoint_files()
        if not found or found[-1][0] != loop.plan.steps:
            self.save(loop, loop.plan.steps)


class EvalHook(Hook):
    """Evaluates every ``every`` steps, keeps the history and the best snapshot by
    ``key`` (None: no selection), and writes ``selected.safetensors`` at the end."""

    def __init__(
        self,
        evaluate: Callable[[Networks, StagePlan, int], Scalars] | None,
        every: int,
        key: str | None,
        select_on: str,
        log_scalars: Callable[[Scalars, int], None] | None = None,
        on_eval: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.evaluate, self.every, self.key, self.select_on = evaluate, every, key, select_on
        self.log_scalars, self.on_eval = log_scalars, on_eval

    def after_step(self, loop: StageView, result: StepResult) -> None:
        step, plan = loop.state.step, loop.plan
        if self.evaluate is None or not _due(step, self.every, plan.steps):
            return
        with eval_mode(*loop.nets.modules()):
            scores = self.evaluate(loop.nets, plan, step)
        loop.state.history.append(
            {"stage": plan.name, "step": step, "global_step": plan.global_offset + step, **scores}
        )
        best, key = loop.state.best, self.key
        if key and key in scores and not math.isnan(scores[key]) and (best is None or scores[key] > best["value"]):
            loop.state.best = {"step": step, "value": scores[key], "key": key}
            if loop.runtime.is_main:
                save_best(loop.stage, loop.nets, plan.name, loop.state.best)
        if loop.runtime.is_main:
            loop.log.info(
                "%s step %d evaluation: %s", plan.name, step, " ".join(f"{k}={v:.2f}" for k, v in scores.items())
            )
            if self.log_scalars:
                self.log_scalars({f"eval/{k}": v for k, v in scores.items()}, plan.global_offset + step)
            if self.on_eval:
                self.on_eval(loop.state.history)

    def after_stage(self, loop: StageView) -> None:
        if loop.runtime.is_main:
            write_selected(
                loop.stage, loop.nets, loop.plan.name, loop.plan.steps, loop.state.best, self.select_on, loop.log
            )


@dataclass(frozen=True)
class LogSettings:
    """How often :class:`LogHook` logs, and where."""

    log_every: int
    image_every: int
    digest_every: int
    progress: bool
    heartbeat: str | None = None  # a run's name: print a progress line now and then instead of a bar
    heartbeat_every: float = 30.0


class LogHook(Hook):
    """The progress bar, the loss scalars every ``log_every`` steps, TensorBoard images
    every ``image_every`` steps and, with ``digest_every``, per-rank parameter digests.

    ``heartbeat`` (a run's name) prints ``<name>: <stage> step <n>/<total> (<s> s)`` on
    stderr every ``heartbeat_every`` seconds and at the stage's end: what runs training in
    parallel processes without a bar (``dast demo``) show instead."""

    def __init__(
        self,
        settings: LogSettings,
        log_scalars: Callable[[Scalars, int], None] | None = None,
        log_images: Callable[[Networks, Batch, StagePlan, int], None] | None = None,
    ) -> None:
        self.settings, self.log_scalars, self.log_images = settings, log_scalars, log_images
        self.bar: Any = None
        self._t0 = self._last_beat = time.monotonic()

    def before_stage(self, loop: StageView) -> None:
        self._t0 = self._last_beat = time.monotonic()
        if self.settings.progress and loop.runtime.is_main:
            self.bar = tqdm(
                total=loop.plan.steps,
                initial=loop.state.step,
                desc=loop.plan.name,
                unit="it",
                dynamic_ncols=True,
                mininterval=1.0,
            )

    def before_step(self, loop: StageView) -> None:
        if self.bar is not None and self.bar.n != loop.state.step:  # after a rollback
            self.bar.n = loop.state.step
            self.bar.refresh()

    def after_step(self, loop: StageView, result: StepResult) -> None:
        step, plan, main, s = loop.state.step, loop.plan, loop.runtime.is_main, self.settings
        if self.bar is not None:
            self.bar.update(1)
        if result.applied and _due(step, s.log_every, plan.steps):
            self._log_losses(loop, result)
        if self.log_images and main and step % s.image_every == 0 and loop.current is not None:
            source, target = loop.current
            self.log_images(loop.nets, target if target is not None else source, plan, plan.global_offset + step)
        if s.digest_every and step % s.digest_every == 0:
            nets = loop.nets
            networks = {"segmentor": nets.segmentor, "discoverer": nets.discoverer, "corrector": nets.corrector}
            write_digest(loop.run_digests, plan.name, step, parameter_digest(networks))
        now = time.monotonic()
        if s.heartbeat and main and (now - self._last_beat >= s.heartbeat_every or step == plan.steps):
            self._last_beat = now
            sys.stderr.write(f"{s.heartbeat}: {plan.name} step {step}/{plan.steps} ({now - self._t0:.0f} s)\n")
            sys.stderr.flush()

    def _log_losses(self, loop: StageView, result: StepResult) -> None:
        step, plan = loop.state.step, loop.plan
        scalars = {k: float(v) for k, v in result.scalars.items()}
        scalars["lr/segmentor"] = result.lr
        scalars["lr/discriminators"] = result.lr_d
        if self.bar is not None:
            self.bar.set_postfix(seg=f"{scalars['loss/seg']:.3f}", refresh=False)
        if loop.runtime.is_main:
            loop.log.info(
                "%s step %d/%d %s",
                plan.name,
                step,
                plan.steps,
                " ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in scalars.items() if k.startswith("loss/")),
            )
            if self.log_scalars:
                self.log_scalars({f"{plan.name}/{k}": v for k, v in scalars.items()}, plan.global_offset + step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_stage(self, loop: StageView) -> None:
        self.close()

    def on_failure(self, loop: StageView, exc: BaseException) -> None:
        self.close()


class FaultHook(Hook):
    """The non-finite-loss policy: the skipped step's BatchNorm statistics are undone, and
    ``rollback`` restores the latest checkpoint at a lower learning rate; ``max_consecutive``
    faults in a row stop the stage with :class:`NumericalFault`. A step the update policy
    skipped without a fault (an fp16 overflow) is logged and not counted. The streak is
    not checkpointed: it must survive the rollbacks it causes."""

    def __init__(self, policy: str, max_consecutive: int, lr_factor: float) -> None:
        self.policy, self.max_consecutive, self.lr_factor = policy, max_consecutive, lr_factor
        self.consecutive = 0
        self.fault_step: int | None = None  # the latest faulty step of the current streak
        self.buffers: BufferGuard | None = None

    def before_stage(self, loop: StageView) -> None:
        self.buffers = BufferGuard(loop.nets.modules())

    def before_step(self, loop: StageView) -> None:
        assert self.buffers is not None
        self.buffers.save()

    def after_step(self, loop: StageView, result: StepResult) -> None:
        if result.applied:
            self.on_success(result.step)
        elif result.overflow:
            loop.log.info("%s step %d: %s", loop.plan.name, result.step, result.note)
        else:
            source, target = loop.current or ({"name": []}, None)
            names = list(source["name"]) + (list(target["name"]) if target is not None else [])
            self.on_fault(loop, result, names)

    def on_success(self, step: int) -> None:
        """A step at or past the last faulty one succeeded: the streak is over (steps
        replayed after a rollback do not end it)."""
        if self.fault_step is not None and step >= self.fault_step:
            self.consecutive, self.fault_step = 0, None

    def on_fault(self, loop: StageView, result: StepResult, names: list[str]) -> None:
        """Handle a step that was not applied: skip it, or roll back."""
        assert self.buffers is not None
        self.buffers.restore()  # the weights are those before the step: undo its forward passes
        step, plan, log = result.step, loop.plan, loop.log
        self.consecutive += 1
        self.fault_step = step if self.fault_step is None else max(self.fault_step, step)
        log.warning(
            "%s step %d: non-finite loss (%s); batch: %s",
            plan.name,
            step,
            ", ".join(f"{k}={float(v):.4g}" for k, v in result.scalars.items() if k.startswith("loss/")),
            ", ".join(names),
        )
        if self.consecutive >= self.max_consecutive:
            raise NumericalFault(
                f"{self.consecutive} consecutive non-finite losses in {plan.name} at step {step} "
                f"(last batch: {', '.join(names)}); see log.txt"
            )
        if self.policy != "rollback":
            return
        scale = loop.engine.lr_scale * self.lr_factor  # compounds over repeated rollbacks
        last = agreed_latest_checkpoint(loop.stage, loop.runtime)
        if last is None:
            loop.engine.lr_scale = scale
            log.warning(
                "%s: no checkpoint to roll back to yet; skipped step %d, learning-rate scale %g", plan.name, step, scale
            )
            return
        loop.restore(last)
        loop.engine.lr_scale = scale
        log.warning("%s: rolled back to step %d with learning-rate scale %g", plan.name, loop.state.step, scale)


@dataclass(frozen=True)
class HookInputs:
    """What the pipeline gives the hooks of a stage: its callbacks (all optional) and how
    to show progress."""

    evaluate: Callable[[Networks, StagePlan, int], Scalars] | None = None
    log_scalars: Callable[[Scalars, int], None] | None = None
    log_images: Callable[[Networks, Batch, StagePlan, int], None] | None = None
    on_eval: Callable[[list[dict[str, Any]]], None] | None = None
    progress: bool = True
    heartbeat: str | None = None


def selection_key(cfg: Config) -> str | None:
    """The score that picks a stage's best snapshot, or None."""
    if cfg.selection.select_on == "synthetic" and cfg.selection.enabled:
        return "synthetic"
    if cfg.selection.select_on == "target":
        return "target"
    return None


def default_hooks(cfg: Config, plan: StagePlan, inputs: HookInputs, extra: Sequence[Hook] = ()) -> list[Hook]:
    """The hooks of a stage, in the order they run: the fault policy first (a rollback ends
    the iteration), then ``extra``, logging, evaluation and last the checkpoints, so that a
    checkpoint taken after a step records everything that step changed."""
    tr = cfg.train
    return [
        FaultHook(cfg.faults.policy, cfg.faults.max_consecutive, cfg.faults.lr_factor),
        *extra,
        LogHook(
            LogSettings(tr.log_every, tr.image_every, tr.digest_every, inputs.progress, heartbeat=inputs.heartbeat),
            inputs.log_scalars,
            inputs.log_images,
        ),
        EvalHook(
            inputs.evaluate,
            plan.eval_every,
            selection_key(cfg),
            cfg.selection.select_on,
            inputs.log_scalars,
            inputs.on_eval,
        ),
        CheckpointHook(tr.checkpoint_every, tr.keep_last),
    ]


class BufferGuard:
    """A copy of modules' buffers (batch-norm running statistics and counters), so that a
    step whose update is skipped leaves no trace of its non-finite forward passes."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for m in modules:
            for b in m.buffers():
                groups.setdefault((b.dtype, b.device), []).append(b)
        # one fused copy per dtype and device
        self.groups = [(live, [b.detach().clone() for b in live]) for live in groups.values()]

    @torch.no_grad()
    def save(self) -> None:
        for live, saved in self.groups:
            _copy_all(saved, live)

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.groups:
            _copy_all(live, saved)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        foreach_copy(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def parameter_digest(modules: Mapping[str, torch.nn.Module | None], buffers: bool = False) -> dict[str, float]:
    """float64 sums of every module's parameters (and, with ``buffers``, its buffers): equal
    on all ranks of a DDP run whose modules are equal."""
    out = {}
    for name, m in modules.items():
        if m is not None:
            tensors = list(m.parameters()) + (list(m.buffers()) if buffers else [])
            out[name] = float(sum(t.detach().double().sum().item() for t in tensors))
            out[name + "_abs"] = float(sum(t.detach().double().abs().sum().item() for t in tensors))
    return out


def write_digest(path: Path, stage: str, step: int, digest: dict[str, float]) -> None:
    """Append one digest record to a rank's ``digests/rank<r>.jsonl``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"stage": stage, "step": step, **digest}) + "\n")
