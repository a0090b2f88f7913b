"""Data-parallel training and evaluation with torchrun/gloo on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_engine import _batch, _cfg, _networks, _runtime

from dast.cli import main
from dast.config import DatasetConfig, load_config
from dast.data.datasets import build_dataset
from dast.errors import UserError
from dast.evaluation.evaluate import evaluate_model
from dast.execution import Execution
from dast.models import build_discoverer, build_segmentor
from dast.models.target_model import TargetModel
from dast.training.engine import Engine
from dast.training.pipeline import train
from dast.training.step import Batch

DDP_TRAIN = {
    "model": {"batchnorm": "per_image"},
    "train": {"steps": 3, "lr": 5e-4, "batch_size": 1, "checkpoint_every": 3, "eval_every": 3, "digest_every": 1},
    "selection": {"enabled": False},
}


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dast", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _digests(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _params(path: Path) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in load_file(str(path)).items()
        if not k.startswith("rng.") and "running_" not in k and "num_batches" not in k
    }


@pytest.mark.slow
def test_two_ranks_train_in_lockstep_and_match_one_process(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(**DDP_TRAIN)
    two, one = tmp_path / "two", tmp_path / "one"
    res = _torchrun(["train", "--config", str(cfg), "--out", str(two), "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = _digests(two / "digests" / "rank0.jsonl"), _digests(two / "digests" / "rank1.jsonl")
    assert [d["step"] for d in r0] == [1, 2, 3]
    assert r0 == r1  # identical parameters on both ranks after every step
    # one process, the same effective batch (2) and data order
    assert main(["train", "--config", str(cfg), "--out", str(one), "--set", "train.batch_size=2", "--no-progress"]) == 0
    a = _params(one / "stage1" / "checkpoints" / "step_00000003.safetensors")
    b = _params(two / "stage1" / "checkpoints" / "step_00000003.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)
    # only rank 0 writes the run directory's files
    assert (two / "final" / "model.safetensors").is_file() and (two / "log.txt").is_file()


@pytest.mark.slow
def test_forward_target_alone_still_synchronises_the_gradients(tiny_config, tmp_path: Path) -> None:
    """source_only_bn under torchrun: the target forward has no loss, so the source backward
    is the only one and must all-reduce (it once ran under no_sync and the ranks drifted)."""
    no_adversary = {"discoverer": False, "corrector": False, "attention": False}
    cfg = tiny_config(**DDP_TRAIN, adversarial=no_adversary)
    run = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--out", str(run), "--no-progress", "--set", "train.forward_target=true"]
    res = _torchrun(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = _digests(run / "digests" / "rank0.jsonl"), _digests(run / "digests" / "rank1.jsonl")
    assert [d["step"] for d in r0] == [1, 2, 3]
    assert r0 == r1


@pytest.mark.slow
def test_the_online_teacher_is_identical_on_both_ranks(tiny_config, tmp_path: Path) -> None:
    """Under torchrun the teacher's EMA sees identical students, and its BatchNorm statistics
    (which each rank's own batches move) are rank 0's on every rank; the online losses all-
    reduce their gradients once per iteration, so the students stay in lockstep too."""
    online = {"mode": "online", "steps": 3, "eval_every": 3, "online": {"threshold": 0.2, "masking": {"block": 8}}}
    cfg = tiny_config(**{**DDP_TRAIN, "model": {"batchnorm": "batch"}, "self_training": online})
    run = tmp_path / "run"
    res = _torchrun(["train", "--config", str(cfg), "--out", str(run), "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = _digests(run / "digests" / "rank0.jsonl"), _digests(run / "digests" / "rank1.jsonl")
    teacher = [d for d in r0 if d["stage"] == "online" and "teacher" in d]
    assert [d["step"] for d in teacher] == [1, 2, 3] and teacher[0]["teacher_abs"] > 0
    assert r0 == r1  # students and teachers, every step


def _fault_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        nets = _networks()
        plan = helpers.plan("stage1", 0, 4)
        engine = Engine.build(plan, _cfg(), nets, _runtime())
        engine.train_modes(nets.modules())
        xs, ys, xt = _batch()
        if rank == 1:
            xs[0, 0, 0, 0] = float("inf")  # only this rank's loss is non-finite
        before = [p.detach().clone() for p in nets.segmentor.parameters()]
        result = engine.step(0, Batch(xs, ys, xt, None))
        unchanged = all(torch.equal(a, b) for a, b in zip(before, nets.segmentor.parameters()))
        Path(f"{out}.{rank}").write_text(json.dumps([result.applied, unchanged]))
    finally:
        dist.destroy_process_group()


def test_a_fault_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    """Without agreement the finite rank applied its update and the ranks diverged."""
    out = str(tmp_path / "r")
    mp.spawn(_fault_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    assert [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)] == [[False, True], [False, True]]


def _group_worker(rank: int, world: int, port: int, cfg_path: str, out: str, case: str) -> None:
    """train() under a torchrun-like environment, in one of three cases."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    cfg = load_config(cfg_path)
    if case == "theirs":
        dist.init_process_group("gloo")  # the caller's own group
    if case == "failing":
        # the source folder vanishes after the config was checked: the run fails inside the group
        cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"kind": "folder", "root": out + "/gone"})})
    try:
        train(cfg, Path(out) / "run", progress=False)
    except UserError:
        pass
    Path(f"{out}/seen.{rank}").write_text(json.dumps(dist.is_initialized()))
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("case, alive", [("ok", False), ("failing", False), ("theirs", True)])
def test_training_ends_only_the_process_group_it_created(tiny_config, tmp_path: Path, case: str, alive: bool) -> None:
    cfg = tiny_config(**DDP_TRAIN)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_group_worker, args=(2, port, str(cfg), str(tmp_path), case), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"seen.{r}").read_text()) for r in (0, 1)] == [alive, alive]


def _eval_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model, ds = _eval_setup()
        m = evaluate_model(
            model, ds, Execution(progress=False, indices=list(range(rank, len(ds), world))), distributed=True
        )
        if rank == 0:
            Path(out).write_text(json.dumps(m))
    finally:
        dist.destroy_process_group()


def _eval_setup():
    torch.manual_seed(0)
    seg = build_segmentor("small", 7, "paper")
    model = TargetModel(seg, build_discoverer(seg.feature_channels)).eval()
    cfg = DatasetConfig(kind="synthetic", domain="target", count=5, size=(64, 32))
    return model, build_dataset(cfg, norm="unit", num_classes=7, with_labels=True, seed=1)


def test_distributed_evaluation_equals_single_process(tmp_path: Path) -> None:
    model, ds = _eval_setup()
    single = evaluate_model(model, ds, Execution(progress=False))
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "m.json")), nprocs=2, join=True)
    two = json.loads((tmp_path / "m.json").read_text())
    assert two == json.loads(json.dumps(single))
