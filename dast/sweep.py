"""Run many trainings (configs x seeds) across the available GPUs.

Each job is an ordinary ``python -m dast train`` process: the sweep only schedules
them, one per device slot, with ``CUDA_VISIBLE_DEVICES`` set, and resumes a job whose
run directory already exists. Nothing of the training code is repeated here.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dast.config import resolve_config_path
from dast.errors import UserError
from dast.rundir import RunDir


@dataclass
class Job:
    config: Path
    seed: int
    run_dir: Path
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run_dir.name

    def command(self, device: str | None) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "dast",
            "train",
            "--config",
            str(self.config),
            "--out",
            str(self.run_dir),
            "--set",
            f"seed={self.seed}",
            "--no-progress",
        ]
        for o in self.overrides:
            cmd += ["--set", o]
        if RunDir(self.run_dir).config.exists():
            cmd.append("--resume")
        if device == "cpu":
            cmd += ["--device", "cpu"]
        return cmd


def plan_jobs(configs: Sequence[str], seeds: Sequence[int], out: Path, overrides: Sequence[str] = ()) -> list[Job]:
    """One job per (config, seed); run directories are ``out/<config stem>_seed<seed>``
    (``<folder>_<stem>`` when two configs share a stem, e.g. gta5/resnet101/da.yaml)."""
    paths = [resolve_config_path(c) for c in configs]
    stems = [p.stem for p in paths]
    names = [f"{p.parent.parent.name}_{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    if len(set(names)) != len(names):
        raise UserError("two configs map to the same run name; rename one")
    return [Job(p, int(s), out / f"{n}_seed{s}", list(overrides)) for p, n in zip(paths, names) for s in seeds]


def run_sweep(jobs: Sequence[Job], devices: Sequence[str], log_dir: Path, poll: float = 1.0) -> dict[str, int]:
    """Run ``jobs`` with at most one job per device slot; return exit codes by job name.

    ``devices`` are CUDA device ids (``"0"``, ``"1"``, ...) or ``"cpu"`` (repeat it to
    run several CPU jobs at once).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = list(jobs)
    running: dict[str, tuple[subprocess.Popen[bytes], Job]] = {}
    codes: dict[str, int] = {}
    slots = [f"{d}#{i}" for i, d in zip(itertools.count(), devices)]
    free = list(slots)
    while pending or running:
        while pending and free:
            slot = free.pop(0)
            device = slot.split("#")[0]
            job = pending.pop(0)
            env = dict(os.environ)
            if device != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = device
            log = open(log_dir / f"{job.name}.log", "ab")
            proc = subprocess.Popen(job.command(device), stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()
            running[slot] = (proc, job)
            print(f"started {job.name} on {device}", flush=True)
        time.sleep(poll)
        for slot, (proc, job) in list(running.items()):
            rc = proc.poll()
            if rc is not None:
                codes[job.name] = rc
                del running[slot]
                free.append(slot)
                print(f"finished {job.name}: exit {rc}", flush=True)
    return codes
