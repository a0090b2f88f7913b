"""Crash safety and resume: SIGKILL at random and at chosen points (during a checkpoint
write, during pseudo-label writing), SIGTERM/SIGINT, resuming across stage and round
boundaries, the config-change policy on resume, and the numerical-fault policies.

After every interruption `dast train --resume` must finish the run with final weights equal,
bit for bit, to those of an uninterrupted run (CPU, one thread, deterministic tiny config).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import assert_same_weights, final_weights
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dast.atomic import TMP_MARK
from dast.cli import main
from dast.config import deep_merge
from dast.data.datasets import SegmentationDataset
from dast.data.synthetic import scene_stem
from dast.training.sampler import StepSampler

# One DataLoader worker process: the default training path (workers) is the one killed.
CONFIG: dict[str, Any] = {
    "seed": 5,
    "model": {"arch": "small", "num_classes": 7, "norm": "unit"},
    "source": {"kind": "synthetic", "domain": "source", "count": 4, "size": [64, 32]},
    "target": {"kind": "synthetic", "domain": "target", "count": 4, "size": [64, 32], "with_labels": False},
    "val": {"kind": "synthetic", "domain": "target", "count": 2, "size": [64, 32]},
    "train": {
        "steps": 6,
        "poly_steps": 50,
        "lr": 0.01,
        "batch_size": 2,
        "num_workers": 1,
        "checkpoint_every": 1,
        "keep_last": 2,
        "eval_every": 3,
        "image_every": 100,
        "log_every": 1,
    },
    "self_training": {"rounds": 1, "steps": 3, "poly_steps": 50, "preview_count": 1},
    "selection": {"enabled": True, "num_images": 2, "betas": [0.5]},
    "runtime": {"device": "cpu"},
}
# One intra-op thread: the same numbers in every process, and fast on a busy machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CKPT = r"/checkpoints/step_\d{8}\.safetensors$"

# Runs `dast` after arranging for the process to SIGKILL itself at a chosen point:
#   replace N REGEX   on the N-th rename onto a file matching REGEX, after cutting the
#                     temporary file to half its size (a checkpoint write cut short)
#   png N             on the N-th pseudo-label PNG, after writing half of its temporary file
WRAPPER = r"""
import os, re, signal, sys, threading
mode, n, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls, lock = [0], threading.Lock()

def due():
    with lock:
        calls[0] += 1
        return calls[0] == n

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "replace":
    pattern, rest = re.compile(rest[0]), rest[1:]
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if pattern.search(os.fspath(dst)) and due():
            os.truncate(src, os.path.getsize(src) // 2)
            die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
elif mode == "png":
    import io
    import dast.training.pseudo_labels.generate as pl
    from dast.atomic import temp_name
    real_save = pl._save_png
    def save(path, img):
        if due():
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            path.parent.mkdir(parents=True, exist_ok=True)
            temp_name(path).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            die()
        real_save(path, img)
    pl._save_png = save
from dast.cli import main
sys.exit(main(rest))
"""


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_strays():
    yield
    while _STARTED:  # a failed test leaves no training process behind
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_config(path: Path, **over: Any) -> Path:
    path.write_text(yaml.safe_dump(deep_merge(CONFIG, over)))
    return path


def start(args: list[str], log: Path, kill_at: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """Start `dast ARGS` (through WRAPPER when ``kill_at`` is given) as the leader of a new
    process group (with its DataLoader workers, like a job in a terminal); output goes to ``log``."""
    cmd = [sys.executable, "-c", WRAPPER, *kill_at, *args] if kill_at else [sys.executable, "-m", "dast", *args]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=fh, env=ENV, cwd=Path(__file__).parent.parent, start_new_session=True
        )
    _STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    return proc.wait(timeout=timeout)


def dast_run(args: list[str], log: Path, kill_at: tuple[str, ...] = ()) -> int:
    return finish(start(args, log, kill_at))


def pseudo_labels(run: Path, k: int = 1) -> dict[str, np.ndarray]:
    folder = run / f"round{k}" / "pseudo_labels"
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def wait_for(predicate: Any, proc: subprocess.Popen[bytes], timeout: float = 90) -> bool:
    """Poll until ``predicate()`` holds; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return bool(predicate())
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the training process")


def log_after(path: Path, offset: int) -> str:
    return path.read_text(errors="replace")[offset:] if path.exists() else ""


def temp_files(run: Path) -> list[Path]:
    return list(run.rglob(f"*{TMP_MARK}*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted run of CONFIG in a subprocess: (config file, run directory)."""
    root = tmp_path_factory.mktemp("reference")
    cfg = write_config(root / "kill.yaml")
    run = root / "run"
    assert dast_run(["train", "--config", str(cfg), "--out", str(run), "--no-progress"], root / "out.txt") == 0, (
        root / "out.txt"
    ).read_text()
    assert len(pseudo_labels(run)) == 4
    return cfg, run


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_identical_weights(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, ref = reference
    run, out, log = tmp_path / "run", tmp_path / "out.txt", tmp_path / "run" / "log.txt"
    rng = random.Random(20210202)  # seeded: the same kill points every time
    landed = []  # the last log line before each kill
    for attempt in range(3):
        offset = len(log_after(log, 0))
        args = ["train", "--config", str(cfg), "--out", str(run), "--no-progress"]
        proc = start(args + (["--resume"] if attempt else []), out)
        # a random point: after this process's n-th log line (a step, an evaluation, the
        # pseudo labels, ...) plus a random delay, so it does not depend on the machine's speed
        n, delay = rng.randint(1, 6), rng.uniform(0.0, 0.3)
        wait_for(lambda offset=offset, n=n: len(log_after(log, offset).splitlines()) >= n, proc)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            assert finish(proc) == -signal.SIGKILL
            landed.append(log_after(log, 0).strip().splitlines()[-1].split(" ", 3)[-1][:60])
        else:
            assert proc.returncode == 0, out.read_text()
    assert len(landed) >= 2, f"the run ended before it could be killed: {landed}"
    assert dast_run(["train", "--resume", str(run), "--no-progress"], out) == 0, out.read_text()
    assert_same_weights(final_weights(run), final_weights(ref))
    assert not temp_files(run), temp_files(run)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_and_pseudo_label_write(reference: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, ref = reference
    run, out = tmp_path / "run", tmp_path / "out.txt"
    ckpts = run / "stage1" / "checkpoints"

    # 1. killed while the third checkpoint is being written
    code = dast_run(["train", "--config", str(cfg), "--out", str(run), "--no-progress"], out, ("replace", "3", CKPT))
    assert code == -signal.SIGKILL, out.read_text()
    assert sorted(p.name for p in ckpts.glob("step_*.safetensors")) == [
        "step_00000001.safetensors",
        "step_00000002.safetensors",
    ]
    half = [p for p in ckpts.iterdir() if p.name.startswith(f"step_00000003.safetensors{TMP_MARK}")]
    assert len(half) == 1 and half[0].stat().st_size > 0

    # 2. resumed from step 2, then killed while writing the third pseudo-label file
    code = dast_run(["train", "--resume", str(run), "--no-progress"], out, ("png", "3"))
    assert code == -signal.SIGKILL, out.read_text()
    assert not half[0].exists()  # the resumed stage removed the torn temporary file
    labels = run / "round1" / "pseudo_labels"
    assert not (labels / "COMPLETE").exists() and len(list(labels.glob("*.png"))) < 4
    assert [p for p in labels.rglob("*") if TMP_MARK in p.name]
    assert json.loads((run / "manifest.json").read_text())["stages"]["stage1"]["status"] == "complete"

    # 3. the half-written set is detected and regenerated; killed again writing the final model
    code = dast_run(
        ["train", "--resume", str(run), "--no-progress"], out, ("replace", "1", r"/final/model\.safetensors$")
    )
    assert code == -signal.SIGKILL, out.read_text()
    assert (labels / "COMPLETE").is_file() and not (run / "final" / "model.safetensors").exists()
    assert [p for p in (run / "final").iterdir() if TMP_MARK in p.name]

    # 4. the run ends as if never killed
    assert dast_run(["train", "--resume", str(run), "--no-progress"], out) == 0, out.read_text()
    got, want = pseudo_labels(run), pseudo_labels(ref)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert_same_weights(final_weights(run), final_weights(ref))
    assert not temp_files(run), temp_files(run)


# --------------------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.slow
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(reference: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, ref = reference
    run, log = tmp_path / "run", tmp_path / "run" / "log.txt"

    out = tmp_path / "term.txt"
    proc = start(["train", "--config", str(cfg), "--out", str(run), "--no-progress"], out)
    assert wait_for(lambda: "stage1 step 1/6" in log_after(log, 0), proc)
    os.killpg(proc.pid, signal.SIGTERM)  # to the whole group, as job schedulers do: workers included
    assert finish(proc) == 128 + signal.SIGTERM, out.read_text()
    m = re.search(r"SIGTERM received at stage1 step (\d+): checkpoint saved", out.read_text())
    assert m, out.read_text()
    assert (run / "stage1" / "checkpoints" / f"step_{int(m.group(1)):08d}.safetensors").is_file()
    assert "Traceback" not in out.read_text()

    # resumed, then interrupted (Ctrl-C) while the round's pseudo labels are being made
    out = tmp_path / "int.txt"
    offset = len(log.read_text(errors="replace"))
    proc = start(["train", "--resume", str(run), "--no-progress"], out)
    assert wait_for(lambda: "round1: pseudo labels at portion" in log_after(log, offset), proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
    assert finish(proc) == 128 + signal.SIGINT, out.read_text()
    m = re.search(r"SIGINT received at round1 step (\d+): checkpoint saved", out.read_text())
    assert m, out.read_text()
    assert (run / "round1" / "checkpoints" / f"step_{int(m.group(1)):08d}.safetensors").is_file()
    assert "Traceback" not in out.read_text()

    assert dast_run(["train", "--resume", str(run), "--no-progress"], tmp_path / "end.txt") == 0
    assert_same_weights(final_weights(run), final_weights(ref))


# --------------------------------------------------------------------------- resume and config changes


def _meta(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["dast"])


@pytest.mark.slow
def test_longer_rounds_and_more_rounds_continue_across_stage_boundaries(
    reference: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished run (stage 1 + round 1) resumed with longer rounds and a second round:
    stage 1 is not retrained, round 1 continues from its last checkpoint, round 2 starts;
    the result equals a fresh run of the grown config."""
    cfg, ref = reference
    run = tmp_path / "grown"
    shutil.copytree(ref, run)
    stage1 = {p.name: p.read_bytes() for p in (run / "stage1").rglob("*.safetensors")}
    grow = ["--set", "self_training.rounds=2", "--set", "self_training.steps=4"]
    assert main(["train", "--config", str(cfg), "--out", str(run), "--resume", *grow, "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in (run / "stage1").rglob("*.safetensors")} == stage1
    log = (run / "log.txt").read_text()
    assert "round1: resuming from step_00000003.safetensors (step 3)" in log
    assert _meta(run / "round1" / "checkpoints" / "step_00000004.safetensors")["stage_state"]["step"] == 4
    fresh = tmp_path / "fresh"
    cfg2 = write_config(tmp_path / "grown.yaml", self_training={"rounds": 2, "steps": 4})
    # stage 1 of the fresh run comes from the same subprocess-trained reference weights
    assert main(["train", "--config", str(cfg2), "--out", str(fresh), "--no-progress"]) == 0
    assert_same_weights(final_weights(run), final_weights(fresh))

    capsys.readouterr()
    # two rounds have started: longer rounds (round 2 built on the shorter round 1) are refused
    code = main(
        [
            "train",
            "--config",
            str(cfg2),
            "--out",
            str(run),
            "--resume",
            "--set",
            "self_training.steps=5",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "self_training.steps (4 -> 5" in err and "--force" in err


def test_changed_config_is_refused_after_a_round_started_unless_forced(
    reference: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    before = (run / "final" / "model.safetensors").read_bytes()
    cases = {
        "train.steps=8": "train.steps (6 -> 8: self-training already started",
        "self_training.portion=0.6": "self_training.portion (0.5 -> 0.6)",
        "self_training.steps=2": "self_training.steps (3 -> 2: smaller)",
    }
    for setting, message in cases.items():
        code = main(["train", "--config", str(cfg), "--out", str(run), "--resume", "--set", setting, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert (run / "final" / "model.safetensors").read_bytes() == before
    # a round's pseudo labels on disk count as a started round even before the manifest says so
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["stages"]["round1"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    code = main(
        ["train", "--config", str(cfg), "--out", str(run), "--resume", "--set", "train.steps=8", "--no-progress"]
    )
    assert code == 2 and "self-training already started" in capsys.readouterr().err
    # --force accepts a change
    code = main(
        [
            "train",
            "--config",
            str(cfg),
            "--out",
            str(run),
            "--resume",
            "--force",
            "--set",
            "train.log_every=2",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- numerical faults

FAULTS: dict[str, Any] = {
    "seed": 2,
    "model": {"arch": "small", "num_classes": 7, "norm": "unit"},
    "source": {"kind": "synthetic", "domain": "source", "count": 8, "size": [64, 32]},
    "target": {"kind": "synthetic", "domain": "target", "count": 8, "size": [64, 32], "with_labels": False},
    "train": {
        "steps": 6,
        "poly_steps": 50,
        "lr": 0.01,
        "batch_size": 2,
        "num_workers": 0,
        "checkpoint_every": 1,
        "keep_last": 3,
        "image_every": 100,
        "log_every": 1,
    },
    "selection": {"enabled": False},
    "runtime": {"device": "cpu"},
}


def _source_names_at_step(step: int) -> list[str]:
    """The source images stage 1 reads at ``step`` (the sampler is a pure function of the seed)."""
    n, batch = FAULTS["source"]["count"], FAULTS["train"]["batch_size"]
    it = iter(StepSampler(n, batch, FAULTS["seed"] * 10, start_step=step))
    return [scene_stem("source", next(it) % n) for _ in range(batch)]


def poison(monkeypatch: pytest.MonkeyPatch, victims: Any) -> list[str]:
    """Make the images for which ``victims(name, call)`` holds all-NaN; returns the poisoned names."""
    real_item = SegmentationDataset._item
    calls, hit = [0], []

    def item(self: SegmentationDataset, k: int, i: int) -> dict[str, Any]:
        out = real_item(self, k, i)
        calls[0] += 1
        if victims(out["name"], calls[0]):
            out["image"] = torch.full_like(out["image"], float("nan"))
            hit.append(out["name"])
        return out

    monkeypatch.setattr(SegmentationDataset, "_item", item)
    return hit


def fault_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], train: dict[str, Any] | None = None, **faults: Any
) -> tuple[int, str, Path]:

    cfg = tmp_path / "faults.yaml"
    cfg.write_text(yaml.safe_dump(deep_merge(FAULTS, {"faults": faults, "train": train or {}})))
    run = tmp_path / "run"
    code = main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"])
    return code, capsys.readouterr().err, run


def _fault_lines(run: Path) -> list[str]:
    return [line for line in (run / "log.txt").read_text().splitlines() if "non-finite loss" in line]


def test_skip_policy_logs_the_batch_and_leaves_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = _source_names_at_step(2)[0]
    hit = poison(monkeypatch, lambda name, call: name == victim)
    code, err, run = fault_run(tmp_path, capsys, policy="skip", max_consecutive=2)
    assert code == 0, err
    lines = _fault_lines(run)
    assert hit and len(lines) == len(hit)  # every batch holding the NaN image was skipped and logged
    assert "stage1 step 2: non-finite loss" in lines[0] and all(victim in line for line in lines)
    final = final_weights(run)
    # the skipped forward passes did not leave NaN in the batch-norm running statistics
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_a_skipped_step_still_writes_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = _source_names_at_step(2)[0]
    poison(monkeypatch, lambda name, call: name == victim)
    code, err, run = fault_run(tmp_path, capsys, {"checkpoint_every": 3}, policy="skip", max_consecutive=3)
    assert code == 0, err
    assert "stage1 step 2: non-finite loss" in _fault_lines(run)[0]
    # step index 2 is the third step: the checkpoint due after it is there, with no NaN in it
    ckpt = run / "stage1" / "checkpoints" / "step_00000003.safetensors"
    assert _meta(ckpt)["stage_state"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in load_file(str(ckpt)).values() if v.is_floating_point())


def test_rollback_policy_restores_the_last_checkpoint_with_a_lower_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = _source_names_at_step(3)[0]
    once = []

    def first_time(name: str, call: int) -> bool:
        if name == victim and not once:
            once.append(call)
            return True
        return False

    poison(monkeypatch, first_time)
    code, err, run = fault_run(
        tmp_path, capsys, {"checkpoint_every": 2}, policy="rollback", lr_factor=0.25, max_consecutive=2
    )
    assert code == 0, err
    log = (run / "log.txt").read_text()
    assert len(_fault_lines(run)) == 1 and victim in _fault_lines(run)[0]
    assert "stage1 step 3: non-finite loss" in log
    assert "stage1: rolled back to step 2 with learning-rate scale 0.25" in log
    assert log.count("stage1 step 3/6 ") == 2  # step 3 ran, then ran again after the rollback
    assert _meta(run / "stage1" / "checkpoints" / "step_00000006.safetensors")["engine"]["lr_scale"] == 0.25


def test_persistent_fault_stops_with_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under rollback a fault that comes back at the same step is not cured by replaying the
    steps before it: after max_consecutive tries training stops."""
    victim = _source_names_at_step(2)[0]
    poison(monkeypatch, lambda name, call: name == victim)
    code, err, run = fault_run(tmp_path, capsys, policy="rollback", max_consecutive=3)
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 consecutive non-finite losses in stage1 at step 2" in errors[0], err
    assert victim in errors[0] and "log.txt" in errors[0]
    lines = _fault_lines(run)
    assert len(lines) == 3 and all("stage1 step 2: non-finite loss" in line and victim in line for line in lines)
    assert (run / "log.txt").read_text().count("rolled back to step 2 with learning-rate scale") == 2
    assert not (run / "final").exists()


def test_every_batch_faulty_stops_under_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    poison(monkeypatch, lambda name, call: True)
    code, err, run = fault_run(tmp_path, capsys, policy="skip", max_consecutive=2)
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 consecutive non-finite losses in stage1 at step 1" in errors[0], err
    assert len(_fault_lines(run)) == 2
