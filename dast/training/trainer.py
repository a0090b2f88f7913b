"""The training loop of one stage: stage 1, or one self-training round.

A stage owns a folder ``RUN/<stage>/`` with ``checkpoints/step_<step>.safetensors``
(full state, atomic, the last K kept; steps zero-padded to 8 digits),
``best_step_<step>.safetensors`` while it runs and
``best.safetensors`` once it is done (the best snapshot by the selection score) and
``selected.safetensors`` (what the next stage starts from).

A best snapshot outlives the checkpoints that came before it: an older one is deleted only
once a checkpoint records the newer one as the best, and one newer than the checkpoint a
stage restores (after a rollback, or a kill between an evaluation and the next checkpoint)
is deleted on restore. So the file of the best step of the restored history always exists.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

from dast.atomic import remove_stale_temps
from dast.checkpoint import load_checkpoint, read_meta
from dast.config import Config
from dast.data.workers import close_loader_iterator, worker_init
from dast.errors import NumericalFault
from dast.models.io import Networks, assign_weights, save_networks
from dast.training.optim import discriminator_optimizer, poly_lr, segmentor_optimizer, set_lrs
from dast.training.runtime import Runtime, eval_mode
from dast.training.sampler import StepSampler
from dast.training.state import restore_optimizers, rng_from_flat, save_training_state
from dast.training.step import StepModels, StepSettings, train_step

def _numbered(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{prefix}(\d{{8}})\.safetensors$")


CKPT_RE = _numbered("step_")
BEST_RE = _numbered("best_step_")


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved."""

    def __init__(self, signum: int, stage: str, step: int) -> None:
        self.signum, self.stage, self.step = signum, stage, step
        name = signal.Signals(signum).name
        super().__init__(f"{name} received at {stage} step {step}: checkpoint saved; continue with `dast train --resume`")


@dataclass
class StagePlan:
    """What one stage trains."""

    name: str  # "stage1", "round1", ...
    index: int  # 0 for stage 1, k for round k
    steps: int
    poly_steps: int
    lr: float
    head_lr_mult: float
    duplicate_params: bool
    adversarial: bool
    mu: float = 1.0
    pseudo_dir: Path | None = None
    global_offset: int = 0  # iterations done by earlier stages (for plots)
    lr_mult: float = 1.0  # learning-rate scaling for data-parallel runs (distributed.lr_scaling)


@dataclass
class StageHooks:
    """Callbacks the pipeline provides to the loop (all optional)."""

    evaluate: Callable[[Networks, StagePlan, int], dict[str, float]] | None = None
    log_scalars: Callable[[dict[str, float], int], None] | None = None
    log_images: Callable[[Networks, dict[str, Any], StagePlan, int], None] | None = None
    on_eval: Callable[[list[dict[str, Any]]], None] | None = None


@dataclass
class StageResult:
    selected: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    steps_done: int = 0


def checkpoints_in(folder: Path, pattern: re.Pattern[str] = CKPT_RE) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` (or other files named by step), sorted by step."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    c = checkpoints_in(folder)
    return c[-1][1] if c else None


def _loader(ds: Any, batch: int, seed: int, start: int, rt: Runtime, workers: int) -> Iterator[dict[str, Any]]:
    sampler = StepSampler(len(ds), batch, seed, start, rt.rank, rt.world_size)
    dl = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                    pin_memory=rt.device.type == "cuda", persistent_workers=False,
                    worker_init_fn=worker_init(workers))
    return iter(dl)


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


class SignalFlag:
    """Records SIGTERM/SIGINT instead of dying, so the loop can save and stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "SignalFlag":
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


def run_stage(
    cfg: Config,
    plan: StagePlan,
    nets: Networks,
    rt: Runtime,
    stage_dir: Path,
    source_ds: Any,
    target_ds: Any,
    log: logging.Logger,
    hooks: StageHooks,
    stop: SignalFlag,
    progress: bool = True,
    wrap: Callable[[Networks], StepModels] | None = None,
) -> StageResult:
    """Train one stage to ``plan.steps`` (resuming from the latest checkpoint), then
    write ``selected.safetensors``."""
    ckpt_dir = stage_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(stage_dir)
    tr = cfg.train
    adv = cfg.adversarial
    graphed = rt.device.type == "cuda" and cfg.runtime.cuda_graphs and not rt.distributed
    if cfg.runtime.cuda_graphs and not graphed:
        log.warning("%s: runtime.cuda_graphs needs a single CUDA device (device %s, %d process(es)); running eagerly",
                    plan.name, rt.device, rt.world_size)
    discs = [nets.discoverer if adv.discoverer else None, nets.corrector if adv.corrector else None] if plan.adversarial else []
    seg_opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer | None
    if graphed:  # same update rules and state-dict format, with device-tensor learning rates
        from dast.training.fast import fast_optimizers

        seg_opt, disc_opt = fast_optimizers(nets.segmentor, discs, lr=plan.lr * plan.lr_mult, momentum=tr.momentum,
                                            weight_decay=tr.weight_decay, head_lr_mult=plan.head_lr_mult,
                                            duplicate_params=plan.duplicate_params, lr_d=adv.lr * plan.lr_mult,
                                            betas=adv.betas)
    else:
        seg_opt = segmentor_optimizer(nets.segmentor, lr=plan.lr * plan.lr_mult, momentum=tr.momentum,
                                      weight_decay=tr.weight_decay, head_lr_mult=plan.head_lr_mult,
                                      duplicate_params=plan.duplicate_params)
        disc_opt = discriminator_optimizer(discs, adv.lr, adv.betas)
    base_lr, base_lr_d = plan.lr * plan.lr_mult, adv.lr * plan.lr_mult
    mults = [1.0] if len(seg_opt.param_groups) == 1 else [1.0, plan.head_lr_mult]
    opts = {"segmentor": seg_opt, "discriminators": disc_opt}

    start, history, best, lr_scale, consecutive = 0, [], None, 1.0, 0
    fault_step: int | None = None  # the latest step with a non-finite loss in the current streak
    resume = latest_checkpoint(ckpt_dir)

    def restore(path: Path) -> None:
        nonlocal start, history, best, lr_scale
        tensors, meta = load_checkpoint(path)
        assign_weights(nets, tensors, str(path))
        restore_optimizers(tensors, meta, opts)
        rng_from_flat(tensors, meta.get("rng", {}))
        st = meta["stage_state"]
        start, history, best, lr_scale = int(st["step"]), list(st["history"]), st["best"], float(st["lr_scale"])
        if rt.is_main:
            _prune_best_files(stage_dir, best)  # those of an abandoned path

    if resume is not None:
        restore(resume)
        log.info("%s: resuming from %s (step %d)", plan.name, resume.name, start)

    def save(step: int) -> None:
        if not rt.is_main:
            return
        meta = {"stage_state": {"stage": plan.name, "step": step, "history": history, "best": best, "lr_scale": lr_scale},
                "config": cfg.model_dump(mode="json")}
        save_training_state(ckpt_dir / f"step_{step:08d}.safetensors", nets, opts, meta)
        for _, old in checkpoints_in(ckpt_dir)[: -tr.keep_last]:
            old.unlink(missing_ok=True)
        _prune_best_files(stage_dir, best)  # superseded now that a checkpoint records `best`

    settings = StepSettings(
        adv_loss=adv.loss, lambda_d=adv.lambda_d, lambda_c=adv.lambda_c, attention=adv.attention,
        weight_corrector=adv.corrector_weighting == "attention", reuse_discoverer=tr.reuse_discoverer,
        mu=plan.mu, adversarial=plan.adversarial,
    )
    models = wrap(nets) if wrap else StepModels(nets.segmentor, nets.discoverer, nets.corrector)
    for m in nets.modules():
        m.train()
    step_fn: Callable[..., tuple[dict[str, torch.Tensor], bool]]
    if graphed:  # runtime.cuda_graphs: the whole iteration replayed as CUDA graphs (dast.training.fast)
        from dast.training.fast import GraphedStep

        step_fn = GraphedStep(models, seg_opt, disc_opt, settings, rt.amp_dtype)
    else:
        def step_fn(xs, ys, xt, yt):  # type: ignore[no-untyped-def]
            return train_step(models, seg_opt, disc_opt, xs, ys, xt, yt, settings, rt.autocast)

    def make_iters(at: int) -> tuple[Iterator[dict[str, Any]], Iterator[dict[str, Any]] | None]:
        src = _loader(source_ds, tr.batch_size, cfg.seed * 10 + 2 * plan.index, at, rt, tr.num_workers)
        tgt = None
        if plan.adversarial or settings.attention or plan.pseudo_dir is not None:
            try:
                tgt = _loader(target_ds, tr.batch_size, cfg.seed * 10 + 2 * plan.index + 1, at, rt, tr.num_workers)
            except BaseException:
                close_loader_iterator(src)
                raise
        return src, tgt

    src_it, tgt_it = make_iters(start)
    buffers = BufferGuard(nets.modules())
    bar = None
    if progress and rt.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.steps, initial=start, desc=plan.name, unit="it", dynamic_ncols=True, mininterval=1.0)
    step = start
    t0 = time.time()
    try:
        while step < plan.steps:
            if stop.signum is not None:
                save(step)
                raise TrainingInterrupted(stop.signum, plan.name, step)
            lr = poly_lr(base_lr * lr_scale, step, plan.poly_steps, tr.power)
            set_lrs(seg_opt, lr, mults)
            lr_d = poly_lr(base_lr_d * lr_scale, step, plan.poly_steps, tr.power)
            if disc_opt is not None:
                set_lrs(disc_opt, lr_d, [1.0])
            sb = next(src_it)
            tb = next(tgt_it) if tgt_it is not None else None
            xs = sb["image"].to(rt.device, non_blocking=True)
            ys = sb["label"].to(rt.device, non_blocking=True)
            xt = tb["image"].to(rt.device, non_blocking=True) if tb is not None else xs
            yt = tb["label"].to(rt.device, non_blocking=True) if (tb is not None and plan.pseudo_dir is not None) else None
            if rt.channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
                xt = xt.contiguous(memory_format=torch.channels_last)
            buffers.save()
            out, applied = step_fn(xs, ys, xt, yt)
            if not applied:
                # the update was not applied, so the weights are still those before this step;
                # undo what the step's forward passes did to the running statistics
                buffers.restore()
                consecutive += 1
                fault_step = step if fault_step is None else max(fault_step, step)
                names = list(sb["name"]) + (list(tb["name"]) if tb is not None else [])
                log.warning("%s step %d: non-finite loss (%s); batch: %s", plan.name, step,
                            ", ".join(f"{k}={float(v):.4g}" for k, v in out.items() if k.startswith("loss/")), ", ".join(names))
                if consecutive >= cfg.faults.max_consecutive:
                    raise NumericalFault(
                        f"{consecutive} consecutive non-finite losses in {plan.name} at step {step} "
                        f"(last batch: {', '.join(names)}); see log.txt"
                    )
                if cfg.faults.policy == "rollback":
                    scale = lr_scale * cfg.faults.lr_factor  # compounds over repeated rollbacks
                    last = latest_checkpoint(ckpt_dir)
                    if last is not None:
                        restore(last)
                        if hasattr(step_fn, "reset"):
                            step_fn.reset()  # the captured graphs hold the old buffers
                        step = start
                        close_loader_iterator(src_it)
                        close_loader_iterator(tgt_it)
                        src_it, tgt_it = make_iters(step)
                        lr_scale = scale
                        log.warning("%s: rolled back to step %d with learning-rate scale %g", plan.name, start, lr_scale)
                        if bar is not None:
                            bar.n = step
                            bar.refresh()
                        continue
                    lr_scale = scale
                    log.warning("%s: no checkpoint to roll back to yet; skipped step %d, learning-rate scale %g",
                                plan.name, step, lr_scale)
                # a skipped step still counts: its evaluation and checkpoint (if due) follow
            elif fault_step is not None and step >= fault_step:
                # a step at or past the last faulty one succeeded: the fault streak is over
                # (steps replayed after a rollback do not end it)
                consecutive, fault_step = 0, None
            step += 1
            if bar is not None:
                bar.update(1)
            if applied and (step % tr.log_every == 0 or step == plan.steps):
                scalars = {k: float(v) for k, v in out.items()}
                scalars["lr/segmentor"] = lr
                scalars["lr/discriminators"] = lr_d
                if bar is not None:
                    bar.set_postfix(seg=f"{scalars['loss/seg']:.3f}", refresh=False)
                if rt.is_main:
                    log.info("%s step %d/%d %s", plan.name, step, plan.steps,
                             " ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in scalars.items() if k.startswith("loss/")))
                    if hooks.log_scalars:
                        hooks.log_scalars({f"{plan.name}/{k}": v for k, v in scalars.items()}, plan.global_offset + step)
            if hooks.log_images and rt.is_main and (step % tr.image_every == 0):
                hooks.log_images(nets, tb if tb is not None else sb, plan, plan.global_offset + step)
            if hooks.evaluate and (step % tr.eval_every == 0 or step == plan.steps):
                with eval_mode(*nets.modules()):
                    scores = hooks.evaluate(nets, plan, step)
                entry = {"stage": plan.name, "step": step, "global_step": plan.global_offset + step, **scores}
                history.append(entry)
                key = _selection_key(cfg)
                if key and key in scores and not math.isnan(scores[key]) and (best is None or scores[key] > best["value"]):
                    best = {"step": step, "value": scores[key], "key": key}
                    if rt.is_main:
                        save_networks(_best_file(stage_dir, step), nets,
                                      extra_meta={"stage": plan.name, "step": step, "selection": best})
                if rt.is_main:
                    log.info("%s step %d evaluation: %s", plan.name, step, " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
                    if hooks.log_scalars:
                        hooks.log_scalars({f"eval/{k}": v for k, v in scores.items()}, plan.global_offset + step)
                    if hooks.on_eval:
                        hooks.on_eval(history)
            if tr.digest_every and step % tr.digest_every == 0:
                _write_digest(stage_dir.parent / "digests" / f"rank{rt.rank}.jsonl", plan.name, step, nets)
            if step % tr.checkpoint_every == 0 or step == plan.steps:
                save(step)
    finally:
        for it in (src_it, tgt_it):  # even when an exception leaves the loop
            close_loader_iterator(it)
        if bar is not None:
            bar.close()
    if resume is None or start < plan.steps:
        log.info("%s: %d steps in %.1f s", plan.name, plan.steps - start, time.time() - t0)
    if not checkpoints_in(ckpt_dir) or checkpoints_in(ckpt_dir)[-1][0] != plan.steps:
        save(plan.steps)
    selected = stage_dir / "selected.safetensors"
    if rt.is_main:
        best_path = _find_best_file(stage_dir, best)
        if best is not None and best_path is not None and cfg.selection.select_on != "last":
            tensors, _ = load_checkpoint(best_path)
            sel = Networks(nets.spec, nets.segmentor, nets.discoverer, nets.corrector)
            # write the best weights as the selected model without disturbing `nets`
            from dast.checkpoint import save_checkpoint

            save_checkpoint(selected, tensors, {"kind": "model", "model": sel.spec.to_dict(), "stage": plan.name,
                                                "step": best["step"], "selection": best})
            log.info("%s: selected step %d (%s = %.2f)", plan.name, best["step"], best["key"], best["value"])
            if best_path.name != "best.safetensors":
                best_path.replace(stage_dir / "best.safetensors")
            _prune_best_files(stage_dir, None)
        else:
            if best is not None and cfg.selection.select_on != "last":
                log.warning("%s: the best snapshot (step %d) is not on disk; selecting the last step",
                            plan.name, best["step"])
            save_networks(selected, nets, extra_meta={"stage": plan.name, "step": plan.steps, "selection": None})
            log.info("%s: selected the last step (%d)", plan.name, plan.steps)
    return StageResult(selected=selected, history=history, steps_done=plan.steps)


def _best_file(stage_dir: Path, step: int) -> Path:
    return stage_dir / f"best_step_{step:08d}.safetensors"


def _prune_best_files(stage_dir: Path, best: dict[str, Any] | None) -> None:
    """Delete the per-step best snapshots other than that of ``best`` (all if None)."""
    keep = None if best is None else int(best["step"])
    for step, p in checkpoints_in(stage_dir, BEST_RE):
        if step != keep:
            p.unlink(missing_ok=True)


def _find_best_file(stage_dir: Path, best: dict[str, Any] | None) -> Path | None:
    """The snapshot of ``best``'s step: its per-step file, or a finished stage's
    ``best.safetensors`` if that records the same step; None if neither exists."""
    if best is None:
        return None
    per_step = _best_file(stage_dir, int(best["step"]))
    if per_step.exists():
        return per_step
    final = stage_dir / "best.safetensors"
    if final.exists() and read_meta(final).get("step") == best["step"]:
        return final
    return None


def parameter_digest(nets: Networks) -> dict[str, float]:
    """float64 sums of every network's parameters (equal on all ranks of a DDP run)."""
    out = {}
    for name, m in (("segmentor", nets.segmentor), ("discoverer", nets.discoverer), ("corrector", nets.corrector)):
        if m is not None:
            out[name] = float(sum(p.detach().double().sum().item() for p in m.parameters()))
            out[name + "_abs"] = float(sum(p.detach().double().abs().sum().item() for p in m.parameters()))
    return out


def _write_digest(path: Path, stage: str, step: int, nets: Networks) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"stage": stage, "step": step, **parameter_digest(nets)}) + "\n")


def _selection_key(cfg: Config) -> str | None:
    if cfg.selection.select_on == "synthetic" and cfg.selection.enabled:
        return "synthetic"
    if cfg.selection.select_on == "target":
        return "target"
    return None
