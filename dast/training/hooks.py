"""What happens around each iteration of a stage, one job per hook.

A hook sees the running :class:`~dast.training.loop.StageLoop` (its plan, networks,
engine, state and stage folder) at three moments: ``before_stage`` (after a resume),
``after_step`` (after an applied or skipped iteration) and ``after_stage``; ``close``
runs even when the stage fails. The loop calls them in list order, so a checkpoint taken
after a step records the evaluation of that step.

* :class:`LogHook`: progress bar, scalars (log, TensorBoard, ``scalars.jsonl``), images, digests.
* :class:`EvalHook`: evaluation history, best snapshot, final selection.
* :class:`CheckpointHook`: full-state checkpoints, pruning, restore (resume, rollback, SIGTERM).
* :class:`FaultHook`: the non-finite-loss policy (skip or roll back), called by the loop
  when an iteration was not applied.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from dast.atomic import remove_stale_temps
from dast.checkpoint import load_checkpoint
from dast.contexts import eval_mode
from dast.errors import NumericalFault
from dast.models.io import Networks, assign_weights
from dast.training.engine import StagePlan, StepResult
from dast.training.snapshots import prune_best_files, save_best, write_selected
from dast.training.state import restore_optimizers, rng_from_flat, save_training_state

if TYPE_CHECKING:  # the loop imports the hooks
    from dast.training.loop import StageLoop

Scalars = dict[str, float]
Batch = dict[str, Any]
# fp16: a loss scale below this (fp16's smallest subnormal, 2^-24) cannot bring the
# gradients into range: every step would be skipped
MIN_LOSS_SCALE = 2.0**-24


@dataclass
class StageState:
    """What a checkpoint of a stage records besides weights, optimisers and RNG."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


class Hook:
    """The interface; every method is optional."""

    def before_stage(self, loop: StageLoop) -> None:
        pass

    def after_step(self, loop: StageLoop, result: StepResult, source: Batch, target: Batch | None) -> None:
        pass

    def after_stage(self, loop: StageLoop) -> None:
        pass

    def close(self, loop: StageLoop) -> None:
        pass


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


class CheckpointHook(Hook):
    """Saves the full training state every ``every`` steps and at the end (the last
    ``keep_last`` kept), resumes from the latest one, and restores one on request."""

    def __init__(self, every: int, keep_last: int) -> None:
        self.every, self.keep_last = every, keep_last

    def before_stage(self, loop: StageLoop) -> None:
        loop.stage.checkpoints.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(loop.stage.root)
        latest = loop.stage.latest_checkpoint()
        loop.resumed = latest is not None
        if latest is not None:
            self.restore(loop, latest)
            loop.log.info("%s: resuming from %s (step %d)", loop.plan.name, latest.name, loop.state.step)

    def restore(self, loop: StageLoop, path: Path) -> None:
        """Load weights, optimisers, RNG and stage state from checkpoint ``path``."""
        tensors, meta = load_checkpoint(path)
        assign_weights(loop.nets, tensors, str(path))
        restore_optimizers(tensors, meta, loop.engine.optimizers)
        rng_from_flat(tensors, meta.get("rng", {}))
        st = meta["stage_state"]
        loop.state = StageState(int(st["step"]), list(st["history"]), st["best"])
        loop.engine.lr_scale = float(st["lr_scale"])
        if loop.engine.scaler is not None and st.get("grad_scaler"):
            loop.engine.scaler.load_state_dict(st["grad_scaler"])  # fp16: resume at the scale reached
        loop.engine.reset()  # captured graphs hold the replaced tensors
        if loop.runtime.is_main:
            prune_best_files(loop.stage, loop.state.best)  # those of an abandoned path

    def save(self, loop: StageLoop, step: int) -> None:
        if not loop.runtime.is_main:
            return
        st = loop.state
        meta = {
            "stage_state": {
                "stage": loop.plan.name,
                "step": step,
                "history": st.history,
                "best": st.best,
                "lr_scale": loop.engine.lr_scale,
                "grad_scaler": loop.engine.scaler.state_dict() if loop.engine.scaler is not None else None,
            },
            "config": loop.cfg.model_dump(mode="json"),
        }
        save_training_state(loop.stage.checkpoint(step), loop.nets, loop.engine.optimizers, meta)
        for _, old in loop.stage.checkpoint_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        prune_best_files(loop.stage, st.best)  # superseded now that a checkpoint records `best`

    def after_step(self, loop: StageLoop, result: StepResult, source: Batch, target: Batch | None) -> None:
        if _due(loop.state.step, self.every, loop.plan.steps):
            self.save(loop, loop.state.step)

    def after_stage(self, loop: StageLoop) -> None:
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

    def after_step(self, loop: StageLoop, result: StepResult, source: Batch, target: Batch | None) -> None:
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

    def after_stage(self, loop: StageLoop) -> None:
        if loop.runtime.is_main:
            write_selected(
                loop.stage, loop.nets, loop.plan.name, loop.plan.steps, loop.state.best, self.select_on, loop.log
            )


class LogHook(Hook):
    """The progress bar, the loss scalars every ``log_every`` steps, TensorBoard images
    every ``image_every`` steps and, with ``digest_every``, per-rank parameter digests.

    ``heartbeat`` (a run's name) prints ``<name>: <stage> step <n>/<total> (<s> s)`` on
    stderr every ``heartbeat_every`` seconds and at the stage's end: what runs training in
    parallel processes without a bar (``dast demo``) show instead."""

    def __init__(
        self,
        log_every: int,
        image_every: int,
        digest_every: int,
        progress: bool,
        log_scalars: Callable[[Scalars, int], None] | None = None,
        log_images: Callable[[Networks, Batch, StagePlan, int], None] | None = None,
        heartbeat: str | None = None,
        heartbeat_every: float = 30.0,
    ) -> None:
        self.log_every, self.image_every, self.digest_every = log_every, image_every, digest_every
        self.progress, self.log_scalars, self.log_images = progress, log_scalars, log_images
        self.heartbeat, self.heartbeat_every = heartbeat, heartbeat_every
        self.bar: Any = None
        self._t0 = self._last_beat = time.monotonic()

    def before_stage(self, loop: StageLoop) -> None:
        self._t0 = self._last_beat = time.monotonic()
        if self.progress and loop.runtime.is_main:
            self.bar = tqdm(
                total=loop.plan.steps,
                initial=loop.state.step,
                desc=loop.plan.name,
                unit="it",
                dynamic_ncols=True,
                mininterval=1.0,
            )

    def rewind(self, step: int) -> None:
        """Show ``step`` after a rollback."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def after_step(self, loop: StageLoop, result: StepResult, source: Batch, target: Batch | None) -> None:
        step, plan, main = loop.state.step, loop.plan, loop.runtime.is_main
        if self.bar is not None:
            self.bar.update(1)
        if result.applied and _due(step, self.log_every, plan.steps):
            scalars = {k: float(v) for k, v in result.scalars.items()}
            scalars["lr/segmentor"] = result.lr
            scalars["lr/discriminators"] = result.lr_d
            if self.bar is not None:
                self.bar.set_postfix(seg=f"{scalars['loss/seg']:.3f}", refresh=False)
            if main:
                loop.log.info(
                    "%s step %d/%d %s",
                    plan.name,
                    step,
                    plan.steps,
                    " ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in scalars.items() if k.startswith("loss/")),
                )
                if self.log_scalars:
                    self.log_scalars({f"{plan.name}/{k}": v for k, v in scalars.items()}, plan.global_offset + step)
        if self.log_images and main and step % self.image_every == 0:
            self.log_images(loop.nets, target if target is not None else source, plan, plan.global_offset + step)
        if self.digest_every and step % self.digest_every == 0:
            _write_digest(loop.run_digests, plan.name, step, loop.nets)
        now = time.monotonic()
        if self.heartbeat and main and (now - self._last_beat >= self.heartbeat_every or step == plan.steps):
            self._last_beat = now
            sys.stderr.write(f"{self.heartbeat}: {plan.name} step {step}/{plan.steps} ({now - self._t0:.0f} s)\n")
            sys.stderr.flush()

    def close(self, loop: StageLoop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class FaultHook(Hook):
    """The non-finite-loss policy: the skipped step's BatchNorm statistics are undone, and
    ``rollback`` restores the latest checkpoint at a lower learning rate; ``max_consecutive``
    faults in a row stop the stage with :class:`NumericalFault`."""

    def __init__(self, policy: str, max_consecutive: int, lr_factor: float) -> None:
        self.policy, self.max_consecutive, self.lr_factor = policy, max_consecutive, lr_factor
        self.consecutive = 0
        self.fault_step: int | None = None  # the latest faulty step of the current streak
        self.buffers: BufferGuard | None = None

    def before_stage(self, loop: StageLoop) -> None:
        self.buffers = BufferGuard(loop.nets.modules())

    def before_step(self) -> None:
        assert self.buffers is not None
        self.buffers.save()

    def after_result(self, loop: StageLoop, result: StepResult, source: Batch, target: Batch | None) -> bool:
        """Judge one iteration's result; True when the loop rolled back (and must not count
        the step). An fp16 step whose gradients overflowed with finite losses is not a fault:
        the GradScaler skipped it and lowered its scale, as it is meant to."""
        if result.applied:
            self.on_success(loop.state.step)
            return False
        if result.overflow:
            scaler = loop.engine.scaler
            scale = scaler.get_scale() if scaler is not None else None
            loop.log.info(
                "%s step %d: fp16 gradients overflowed; skipped, loss scale now %s",
                loop.plan.name,
                loop.state.step,
                scale,
            )
            if scale is not None and scale < MIN_LOSS_SCALE:
                raise NumericalFault(
                    f"{loop.plan.name} step {loop.state.step}: the fp16 loss scale fell to {scale:g} (below "
                    f"{MIN_LOSS_SCALE:g}): the gradients overflow at any scale; train in bf16 or fp32"
                )
            return False
        names = list(source["name"]) + (list(target["name"]) if target is not None else [])
        return self.on_fault(loop, result, names)

    def on_success(self, step: int) -> None:
        """A step at or past the last faulty one succeeded: the streak is over (steps
        replayed after a rollback do not end it)."""
        if self.fault_step is not None and step >= self.fault_step:
            self.consecutive, self.fault_step = 0, None

    def on_fault(self, loop: StageLoop, result: StepResult, names: list[str]) -> bool:
        """Handle a step that was not applied; True when the loop rolled back (and must not
        count the step)."""
        assert self.buffers is not None
        self.buffers.restore()  # the weights are those before the step: undo its forward passes
        step, plan, log = loop.state.step, loop.plan, loop.log
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
            return False
        scale = loop.engine.lr_scale * self.lr_factor  # compounds over repeated rollbacks
        last = loop.stage.latest_checkpoint()
        if last is None:
            loop.engine.lr_scale = scale
            log.warning(
                "%s: no checkpoint to roll back to yet; skipped step %d, learning-rate scale %g", plan.name, step, scale
            )
            return False
        loop.checkpoints.restore(loop, last)
        loop.engine.lr_scale = scale
        loop.data.restart(loop.state.step)
        loop.logger.rewind(loop.state.step)
        log.warning("%s: rolled back to step %d with learning-rate scale %g", plan.name, loop.state.step, scale)
        return True


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


def parameter_digest(nets: Networks) -> dict[str, float]:
    """float64 sums of every network's parameters (equal on all ranks of a DDP run)."""
    out = {}
    for name, m in (("segmentor", nets.segmentor), ("discoverer", nets.discoverer), ("corrector", nets.corrector)):
        if m is not None:
            out[name] = float(sum(p.detach().double().sum().item() for p in m.parameters()))
            out[name + "_abs"] = float(sum(p.detach().double().abs().sum().item() for p in m.parameters()))
    return out


def _write_digest(path: Path, stage: str, step: int, nets: Networks) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"stage": stage, "step": step, **parameter_digest(nets)}) + "\n")
