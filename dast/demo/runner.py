"""Training the demo's runs and scoring its variants."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dast.checkpoint import read_meta
from dast.config import Config, from_tree
from dast.data.datasets import build_dataset
from dast.errors import NumericalFault, UserError
from dast.evaluation.evaluate import evaluate_model
from dast.execution import Execution
from dast.models.io import Networks, load_networks
from dast.rundir import ONLINE, STAGE1, RunDir, round_name
from dast.training.pipeline import train
from dast.training.setup import fork_stage1
from dast.training.snapshots import best_across_stages


def _train(
    tree: dict[str, Any],
    run_dir: Path,
    label: str | None,
    progress: bool,
    force: bool = False,
    fork: Path | None = None,
) -> float:
    """Train one run (resuming a finished or interrupted one); return its seconds. ``fork``:
    a run whose finished stage 1 this one starts from (it differs only after stage 1)."""
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread per run, runs in parallel instead
    try:
        cfg = from_tree(tree, "demo")
        if fork is not None and not run_dir.exists():
            fork_stage1(fork, run_dir)
        force = force or fork is not None  # the forked stage 1 was trained under the parent's config
        train(cfg, run_dir, resume=RunDir(run_dir).config.exists(), force=force, progress=progress, heartbeat=label)
    finally:
        torch.set_num_threads(threads)  # the caller's process when runs are trained one at a time
    return time.time() - t0


# what a run may fail with that a sweep records instead of stopping (a diverged run, bad settings)
RECORDABLE = (NumericalFault, UserError)


def train_runs(
    trees: dict[str, dict[str, Any]],
    runs: Path,
    workers: int,
    progress: bool,
    force: bool = False,
    failures: dict[str, str] | None = None,
    forks: dict[str, str] | None = None,
) -> dict[str, float]:
    """Train every run, ``workers`` at a time in separate processes (in the given order).

    In parallel, each run prints a heartbeat line (run, stage, step/total, seconds) now and
    then instead of a progress bar. ``force`` resumes runs whose config changed (a sweep
    that continues a finished stage 1 with other self-training settings). ``forks`` maps a
    run to the run (a folder under ``runs``) whose stage 1 it starts from: when that run is
    one of ``trees``, it waits for it to finish. With
    ``failures``, a run that fails with a dast error (e.g. its losses diverged) is recorded
    there (name -> message) and the others go on (except the runs forked from it); without
    it the error is raised."""
    book = _RunBook(trees, runs, progress, force, failures, dict(forks or {}))
    if workers <= 1:
        book.sequential()
    else:
        book.parallel(workers)
    return book.seconds


@dataclass
class _RunBook:
    """The bookkeeping of :func:`train_runs`."""

    trees: dict[str, dict[str, Any]]
    runs: Path
    progress: bool
    force: bool
    failures: dict[str, str] | None
    parents: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)

    def done(self, name: str, result: Any) -> None:
        if isinstance(result, RECORDABLE) and self.failures is not None:
            self.failures[name] = str(result)
            if self.progress:
                print(f"   {name} failed: {result}", flush=True)
            return
        if isinstance(result, BaseException):
            raise result
        self.seconds[name] = result
        if self.progress:
            print(f"   {name} done in {result:.0f} s", flush=True)

    def args(self, name: str, parallel: bool) -> tuple[Any, ...]:
        fork = self.runs / self.parents[name] if name in self.parents else None
        label = name if (parallel and self.progress) else None
        return (self.trees[name], self.runs / name, label, self.progress, self.force, fork)

    def sequential(self) -> None:
        for name in self.trees:
            if self.progress:
                print(f"== training {name}", flush=True)
            if self.parents.get(name) in self.trees and self.parents[name] not in self.seconds:
                continue  # its parent, trained in this call, failed
            try:
                self.done(name, _train(*self.args(name, False)))
            except RECORDABLE as error:
                self.done(name, error)

    def stage1_ready(self, child: str) -> bool:
        """Whether ``child``'s parent has a complete stage 1 to fork (a run of this call may
        still be training its later stages)."""
        return stage1_complete(self.runs / self.parents[child])

    def parallel(self, workers: int, poll: float = 2.0) -> None:
        """At most ``workers`` runs at a time, in the given order, except that a forked run
        goes first as soon as its parent's stage 1 is complete (it is the longest chain)."""
        queue = [n for n in self.trees if self.parents.get(n) not in self.trees]
        waiting = [n for n in self.trees if self.parents.get(n) in self.trees]  # their parents train here
        running: dict[Future[float], str] = {}
        if self.progress:
            print(f"== training {', '.join(self.trees)} ({workers} at a time)", flush=True)
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            while queue or waiting or running:
                for child in [c for c in waiting if self.parents[c] in (self.failures or {})]:
                    waiting.remove(child)  # its parent failed: nothing to fork
                while len(running) < workers:
                    ready = [c for c in waiting if self.stage1_ready(c)]
                    name = ready[0] if ready else (queue[0] if queue else None)
                    if name is None:
                        break
                    (waiting if ready else queue).remove(name)
                    running[pool.submit(_train, *self.args(name, True))] = name
                if not running:  # nothing left to train, and no parent will ever finish a stage 1
                    if waiting:
                        raise RuntimeError(f"no complete stage 1 to fork for {', '.join(waiting)}")
                    break
                finished, _ = wait(list(running), timeout=poll, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = running.pop(fut)
                    exc = fut.exception()
                    self.done(name, exc if exc is not None else fut.result())


def stage1_complete(run: Path) -> bool:
    """Whether a run directory holds a complete stage 1 (its manifest says so and its
    selected snapshot is there)."""
    paths = RunDir(run)
    try:
        entry = json.loads(paths.manifest.read_text()).get("stages", {}).get(STAGE1, {})
    except (OSError, ValueError):
        return False
    return entry.get("status") == "complete" and paths.stage(STAGE1).selected.exists()


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class Snapshot:
    """One scored model: where it is, which stage and step, and its label-free score."""

    path: Path
    stage: str
    step: int | None
    selection: float | None

    def describe(self) -> str:
        return f"{self.stage} step {self.step}" if self.step is not None else self.stage


def _snapshot(path: Path, stage: str) -> Snapshot:
    meta = read_meta(path)
    sel = meta.get("selection") or {}
    step = meta.get("step", sel.get("step"))
    if step is None and isinstance(meta.get("stage_state"), dict):
        step = meta["stage_state"].get("step")
    return Snapshot(
        path,
        stage,
        int(step) if step is not None else None,
        float(sel["value"]) if sel.get("value") is not None else None,
    )


def variant_snapshots(runs: Path, snapshots: dict[str, tuple[str, str]], rounds: int) -> dict[str, dict[str, Snapshot]]:
    """For every variant: its ``selected`` snapshot (what the method reports) and its ``last``
    one (the stage's final step, the same for every method). ``stage1_last`` reports the last
    step as the selected one (the oracle: an upper bound, trained on target labels, that no
    label-free score should pick a snapshot of)."""
    out: dict[str, dict[str, Snapshot]] = {}
    for variant, (run_name, which) in snapshots.items():
        run = RunDir(runs / run_name)
        stage = round_name(rounds) if which in ("last_round", "across_stages") and rounds else STAGE1
        stage = ONLINE if which == ONLINE else stage
        last_path = run.stage(stage).latest_checkpoint()
        selected = _snapshot(run.stage(stage).selected, stage)
        if which == "across_stages":
            best = best_across_stages(run)
            if best is not None:
                selected = _snapshot(best[0], best[1])
        if which == "stage1_last" and last_path is not None:  # a ceiling, not a method: no selection
            selected = _snapshot(last_path, stage)
        out[variant] = {"selected": selected}
        if last_path is not None:
            out[variant]["last"] = _snapshot(last_path, stage)
    return out


def load(snapshot: Snapshot) -> Networks:
    nets, _, _ = load_networks(snapshot.path, "cpu")
    return nets


def evaluate_checkpoint(checkpoint: Path, val: Any) -> tuple[dict[str, Any], Networks]:
    """(metrics of the target model on ``val``, the networks) for a checkpoint, on the CPU."""
    nets, _, _ = load_networks(checkpoint, "cpu")
    return evaluate_model(nets.target_model(), val, Execution(progress=False)), nets


def datasets(tree: dict[str, Any]) -> tuple[Config, Any, Any]:
    """(config, labelled target val set, the target training set with its labels) of a run."""
    cfg = from_tree(tree, "demo")
    n, norm = cfg.model.num_classes, cfg.model.norm
    assert cfg.val is not None  # every demo config names its target val set
    val = build_dataset(cfg.val, norm=norm, num_classes=n, with_labels=True, seed=cfg.seed + 2)
    target = build_dataset(cfg.target, norm=norm, num_classes=n, with_labels=True, seed=cfg.seed + 1)
    return cfg, val, target


def progress_line(text: str, enabled: bool) -> None:
    if enabled:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
