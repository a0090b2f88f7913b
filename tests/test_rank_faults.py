"""Faults under torchrun (two gloo ranks on the CPU): a rank killed at a seeded random step,
a rank stopped with SIGSTOP, rank 0 killed while it writes a checkpoint, a resume on
another number of ranks, and ``dast train --resume auto``.

Each torchrun job runs in its own process group with a hard timeout, so a hang fails the
test instead of holding CI; a restarted job must end with final weights equal, bit for bit,
to those of an uninterrupted two-rank run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY
from helpers import assert_same_weights, final_weights

from dast.atomic import TMP_MARK
from dast.cli import main
from dast.config import deep_merge
from dast.rundir import RunDir
from dast.training.peers import SILENT_S, RankWatch, lost_rank_error
from dast.training.runtime import StepProgress
from dast.training.session import auto_resume_decision

STEPS = 5
# the tiny synthetic config of the suite (conftest.TINY) with 4 images, batch 1, a checkpoint every step
CONFIG: dict[str, Any] = deep_merge(
    {k: v for k, v in TINY.items() if k != "val"},
    {
        "seed": 4,
        "source": {"count": 4},
        "target": {"count": 4},
        "train": {"steps": STEPS, "poly_steps": 50, "batch_size": 1, "checkpoint_every": 1, "eval_every": 100},
        "self_training": {"rounds": 0},
        "selection": {"enabled": False},
    },
)
CONFIG["train"]["image_every"] = 100
HARD_TIMEOUT_S = 150  # no torchrun job of this file may outlive it
CKPT = r"/checkpoints/step_\d{8}\.safetensors$"

# Runs `dast` under torchrun after arranging, from DAST_TEST_FAULT (JSON), for chosen ranks
# of chosen attempts (torchrun's restart count) to stop themselves:
#   {"faults": [{"attempt": A, "rank": R, "signal": S, "at": "step", "n": N}, ...]}
#       at the start of 0-based iteration N (N steps done)
#   {... "at": "checkpoint", "n": N, "pattern": REGEX}
#       on the N-th rename onto a checkpoint, after cutting the temporary file to half its
#       size (a write cut short)
#   {"own_view": DECISION}  rank 1's own look at the run directory says DECISION
# Every process notes on stderr when it stops itself and when it exits, on the system-wide
# monotonic clock, so the test can time the survivor.
WRAPPER = r"""
import atexit, json, os, re, signal, sys, time
rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

def note(what):
    sys.stderr.write(f"dast-test: rank {rank} attempt {attempt} {what} at {time.monotonic():.3f} pid {os.getpid()}\n")
    sys.stderr.flush()

spec = json.loads(os.environ.get("DAST_TEST_FAULT") or "null") or {}
if spec.get("own_view") and rank == 1:
    import dast.training.session as session
    session.auto_resume_decision = lambda paths: spec["own_view"]
for fault in spec.get("faults", []):
    if fault["rank"] != rank or fault["attempt"] != attempt:
        continue
    sig = getattr(signal, fault["signal"])
    def die(sig=sig):
        note("stops")
        os.kill(os.getpid(), sig)
    if fault["at"] == "step":
        import dast.training.engine as engine
        real_step, n = engine.Engine.step, fault["n"]
        def step(self, i, *args, **kwargs):
            if i == n:
                die()
            return real_step(self, i, *args, **kwargs)
        engine.Engine.step = step
    else:
        pattern, calls, real_replace, n = re.compile(fault["pattern"]), [0], os.replace, fault["n"]
        def replace(src, dst, *args, **kwargs):
            if pattern.search(os.fspath(dst)):
                calls[0] += 1
                if calls[0] == n:
                    os.truncate(src, os.path.getsize(src) // 2)
                    die()
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace
atexit.register(note, "exits")
from dast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Job:
    code: int
    output: str

    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error:")]

    def noted(self, rank: int, what: str, attempt: int = 0) -> float:
        """When (monotonic seconds) a process noted ``what``."""
        found = _note(self.output, rank, what, attempt)
        assert found, f"no note 'rank {rank} attempt {attempt} {what}' in:\n{self.output[-4000:]}"
        return found[0]


def _note(output: str, rank: int, what: str, attempt: int = 0) -> tuple[float, int] | None:
    m = re.search(rf"dast-test: rank {rank} attempt {attempt} {what} at ([\d.]+) pid (\d+)", output)
    return (float(m.group(1)), int(m.group(2))) if m else None


def torchrun(
    tmp: Path,
    cfg: Path,
    run: Path,
    restarts: int = 0,
    fault: dict[str, Any] | None = None,
    extra: tuple[str, ...] = (),
    reap_stopped: bool = False,
) -> Job:
    """`dast train --resume auto` on two gloo ranks, through WRAPPER. ``reap_stopped``: once
    the surviving rank 0 has exited, SIGKILL the rank that stopped itself, as torchrun's
    agent does 30 s after its SIGTERM (which a stopped process never handles)."""
    wrapper = tmp / "wrapper.py"
    wrapper.write_text(WRAPPER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DAST_TEST_FAULT=json.dumps(fault))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        str(wrapper),
        "train",
        "--config",
        str(cfg),
        "--out",
        str(run),
        "--resume",
        "auto",
        "--no-progress",
        *extra,
    ]
    log = tmp / f"torchrun_{run.name}.txt"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + HARD_TIMEOUT_S
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, HARD_TIMEOUT_S)
            output = log.read_text(errors="replace")
            stopped = _note(output, 1, "stops")
            if reap_stopped and stopped and _note(output, 0, "exits"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped[1], signal.SIGKILL)
            time.sleep(0.1)
        code = proc.returncode
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)  # the agent and every worker, stopped ones included
            proc.wait()
    return Job(code, log.read_text(errors="replace"))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def write_config(path: Path, **over: Any) -> Path:
    path.write_text(yaml.safe_dump(deep_merge(CONFIG, over)))
    return path


def temp_files(run: Path) -> list[Path]:
    return list(run.rglob(f"*{TMP_MARK}*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted two-rank run: (config file, run directory)."""
    root = tmp_path_factory.mktemp("reference")
    cfg, run = write_config(root / "faults.yaml"), root / "run"
    # rank 1 alone sees a finished run; rank 0 decides, so both start it
    job = torchrun(root, cfg, run, fault={"own_view": "finished"})
    assert job.code == 0, job.output[-4000:]
    assert "holds a finished run" not in job.output
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2
    return cfg, run


# --------------------------------------------------------------------------- the diagnosis, in one process

GLOO_TIMEOUT = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for recv operation")
GLOO_CLOSED = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:38027: Connection reset by peer")


def _watches(peer_step: int, peer_beats: bool) -> tuple[RankWatch, RankWatch]:
    """Rank 0's watch and its peer's (rank 1) on one in-memory store; both reached
    ``stage1 step <peer_step>``; the peer's thread beats only if ``peer_beats``."""
    store = torch.distributed.HashStore()
    watches = []
    for rank in (0, 1):
        progress = StepProgress()
        progress.reached("stage1", peer_step)
        watches.append(RankWatch(store, rank, 2, progress, beat_s=0.05))
    ours, peer = watches
    peer._beat()  # its last beat before it died, stopped or got stuck
    if peer_beats:
        peer.start()
    return ours.start(), peer


def test_a_silent_rank_is_named_lost() -> None:
    ours, peer = _watches(3, peer_beats=False)
    try:
        err = lost_rank_error(ours, GLOO_CLOSED, 300.0)
    finally:
        ours.stop()
    assert err is not None and err.lost == [1]
    assert str(err).startswith(
        "rank 0: lost rank 1 of 2 (its connection closed; no beat from it for 2 s: killed or hung); "
        "last steps: rank 0 stage1 step 3, rank 1 stage1 step 3. The checkpoints are complete"
    ), err


def test_a_live_rank_whose_training_stopped_is_named_after_a_timeout() -> None:
    """A main thread stuck in its own work: the process beats, but never reaches the
    collective, so it never marks itself failed."""
    ours, peer = _watches(7, peer_beats=True)
    try:
        err = lost_rank_error(ours, GLOO_TIMEOUT, 4.0)
        own = lost_rank_error(ours, RuntimeError("CUDA out of memory"), 4.0)
    finally:
        ours.stop()
        peer.stop()
    assert err is not None and err.lost == [1]
    assert str(err).startswith(
        "rank 0: rank 1 of 2 stopped responding (a collective timed out after 4 s; its process is alive but never "
        "reached the collective: stuck in its own work); last steps: rank 0 stage1 step 7, rank 1 stage1 step 7."
    ), err
    assert own is None  # every rank alive, and no timeout: this rank's own failure, raised as it is


def test_an_unreachable_store_names_the_rank_that_served_it() -> None:
    ours, _ = _watches(2, peer_beats=False)
    ours.stop()
    ours._broken = True  # as after the first failed request to a store whose server died
    err = lost_rank_error(ours, GLOO_CLOSED, 300.0, store_host=0)
    assert err is not None and "lost the other ranks" in str(err)  # rank 0 itself served it: unknown
    ours.rank = 1
    err = lost_rank_error(ours, GLOO_CLOSED, 300.0, store_host=0)
    assert err is not None and err.lost == [0]
    assert str(err).startswith("rank 1: lost rank 0 of 2 (its connection closed; the store it served is unreachable)")


def test_the_heartbeat_line_shows_each_ranks_last_step() -> None:
    ours, peer = _watches(5, peer_beats=False)
    ours._remember(ours.read())
    ours._seen[1] = (ours._seen[1][0], time.monotonic() - 9.4)  # the peer's beat last changed 9 s ago
    assert ours.summary(ours.read()) == "rank 0 stage1 step 5; rank 1 stage1 step 5 (no beat for 9 s)"
    peer.mark("done")
    assert ours.summary(ours.read()) == "rank 0 stage1 step 5; rank 1 stage1 step 5 (done)"
    ours.stop()


# --------------------------------------------------------------------------- a rank that dies


@pytest.mark.slow
def test_killed_ranks_end_the_job_and_restarts_resume_exactly(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """Attempt 0: rank 1 is killed at a seeded random step. Attempt 1, torchrun's restart:
    rank 0 is killed while it writes its first checkpoint. Attempt 2 ends the run."""
    cfg, ref = reference
    run = tmp_path / "run"
    step = random.Random(20220222).randint(1, STEPS - 1)  # seeded: the same step every time
    faults = [
        {"attempt": 0, "rank": 1, "signal": "SIGKILL", "at": "step", "n": step},
        {"attempt": 1, "rank": 0, "signal": "SIGKILL", "at": "checkpoint", "n": 1, "pattern": CKPT},
    ]
    job = torchrun(tmp_path, cfg, run, restarts=2, fault={"faults": faults})
    assert job.code == 0, job.output[-4000:]
    assert "Traceback" not in job.output
    first, second = job.errors()
    # each survivor stopped at once with one line naming the lost rank
    assert first.startswith("error: rank 0: lost rank 1 of 2 (its connection closed;"), first
    assert f"rank 0 stage1 step {step}" in first and "--resume auto" in first
    assert second.startswith("error: rank 1: lost rank 0 of 2 (its connection closed;"), second
    assert job.noted(0, "exits", attempt=0) - job.noted(1, "stops", attempt=0) < SILENT_S + 6
    assert job.noted(1, "exits", attempt=1) - job.noted(0, "stops", attempt=1) < SILENT_S + 6
    # both restarts resumed from the checkpoint of the step the first attempt reached: the
    # second attempt's checkpoint was cut short, and its torn file removed
    log = (run / "log.txt").read_text()
    assert log.count(f"stage1: resuming from step_{step:08d}.safetensors (step {step})") == 2, log
    assert not temp_files(run), temp_files(run)
    assert_same_weights(final_weights(run), final_weights(ref))


# --------------------------------------------------------------------------- a rank that hangs


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_the_collective_timeout(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, _ = reference
    run, timeout_s, step = tmp_path / "run", 4, 2
    job = torchrun(
        tmp_path,
        cfg,
        run,
        fault={"faults": [{"attempt": 0, "rank": 1, "signal": "SIGSTOP", "at": "step", "n": step}]},
        extra=("--set", f"distributed.timeout_s={timeout_s}"),
        reap_stopped=True,
    )
    assert job.code != 0
    errors = job.errors()
    assert len(errors) == 1, job.output[-4000:]
    assert errors[0].startswith(
        f"error: rank 0: lost rank 1 of 2 (a collective timed out after {timeout_s} s; no beat from it"
    ), errors[0]
    waited = job.noted(0, "exits") - job.noted(1, "stops")
    assert timeout_s <= waited < timeout_s + SILENT_S + 6, waited
    # rank 0's heartbeat line showed the last step of each rank, and the silent one
    beats = [line for line in (run / "log.txt").read_text().splitlines() if "heartbeat:" in line]
    assert any(
        f"heartbeat: rank 0 stage1 step {step}; rank 1 stage1 step {step} (no beat for" in line for line in beats
    ), beats
    # nothing half-written: the checkpoints of the steps done are complete, no temporary file
    ckpts = sorted(p.name for p in (run / "stage1" / "checkpoints").iterdir())
    assert ckpts == [f"step_{s:08d}.safetensors" for s in (step - 1, step)]
    assert not temp_files(run)


# --------------------------------------------------------------------------- another world size


def test_a_resume_on_another_number_of_ranks_is_refused_unless_forced(
    reference: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(["train", "--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {run} was trained on 2 rank(s) and is resumed on 1: the images per step (train.batch_size x ranks) "
        "and the gradient averaging would change, so it cannot continue exactly; resume it on 2 rank(s) "
        "(torchrun --nproc_per_node=2), or add --force to continue on 1 anyway (not bitwise; see docs/distributed.md)"
    ]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # forced, the run goes on with one rank, which it then records
    assert main(["train", "--resume", str(run), "--force", "--no-progress"]) == 0
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 1


# --------------------------------------------------------------------------- --resume auto


def auto(cfg: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(cfg), "--out", str(run), "--resume", "auto", "--no-progress", *extra]


def test_resume_auto_starts_resumes_and_leaves_a_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "one.yaml", train={"batch_size": 2})
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert main(auto(cfg, whole)) == 0  # a fresh folder starts
    assert auto_resume_decision(RunDir(whole)) == "finished"
    # a run killed before its last checkpoint (no final model, the manifest's stage still
    # running) resumes from the one before
    shutil.copytree(whole, run)
    (run / "stage1" / "checkpoints" / f"step_{STEPS:08d}.safetensors").unlink()
    shutil.rmtree(run / "final")
    (run / "stage1" / "selected.safetensors").unlink()
    (run / "manifest.json").write_text(json.dumps({"stages": {"stage1": {"status": "running", "steps": STEPS}}}))
    assert auto_resume_decision(RunDir(run)) == "resume"
    capsys.readouterr()
    # the collective timeout may change on resume: it never changes what is trained
    assert main(auto(cfg, run, "--set", "distributed.timeout_s=60")) == 0, capsys.readouterr().err
    assert "stage1: resuming from step_00000004.safetensors (step 4)" in (run / "log.txt").read_text()
    assert_same_weights(final_weights(run), final_weights(whole))
    # a finished run is left as it is
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(auto(cfg, run)) == 0
    assert capsys.readouterr().err.strip() == (
        f"{run} holds a finished run (final/model.safetensors); nothing to do "
        "(--resume without 'auto' continues a finished run whose config grew)"
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_auto_on_folders_that_hold_no_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "one.yaml", train={"batch_size": 2, "steps": 1})
    # only the temporary file of a first start killed while writing config.yaml: a fresh start
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / f"config.yaml{TMP_MARK}123").write_text("seed: ")
    assert main(auto(cfg, torn)) == 0, capsys.readouterr().err
    assert (torn / "final" / "model.safetensors").is_file() and not temp_files(torn)
    # a folder of something else is not taken over
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(auto(cfg, other)) == 2
    err = capsys.readouterr().err
    assert f"error: run directory {other} already exists and is not empty" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    # auto needs a config, since it may have to start the run
    assert main(["train", "--out", str(other), "--resume", "auto"]) == 2
    assert "error: --resume auto needs --config" in capsys.readouterr().err
