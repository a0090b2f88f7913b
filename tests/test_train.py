"""`dast train` end to end on the synthetic domains: resume equivalence and run outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dast.checkpoint import read_meta, save_checkpoint
from dast.cli import main
from dast.rundir import StageDir
from dast.training.snapshots import find_best_file, prune_best_files


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith(("optim.", "rng."))}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_continues_exactly(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(selection={"enabled": False}, val=None)
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--config", str(cfg), "--out", str(full), "--no-progress"]) == 0
    assert main(["train", "--config", str(cfg), "--out", str(split), "--set", "train.steps=2", "--no-progress"]) == 0
    first = _weights(split / "stage1" / "checkpoints" / "step_00000002.safetensors")
    assert main(["train", "--config", str(cfg), "--out", str(split), "--resume", "--no-progress"]) == 0
    a = _weights(full / "stage1" / "checkpoints" / "step_00000004.safetensors")
    b = _weights(split / "stage1" / "checkpoints" / "step_00000004.safetensors")
    _assert_same(a, b)
    _assert_same(_weights(full / "final" / "model.safetensors"), _weights(split / "final" / "model.safetensors"))
    assert any(not torch.equal(first[k], a[k]) for k in a)  # the resumed run did train


def test_seeded_runs_are_bitwise_reproducible(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(selection={"enabled": False}, val=None, train={"steps": 2})
    for name in ("a", "b"):
        assert main(["train", "--config", str(cfg), "--out", str(tmp_path / name), "--no-progress"]) == 0
    _assert_same(_weights(tmp_path / "a/final/model.safetensors"), _weights(tmp_path / "b/final/model.safetensors"))


def test_resume_refuses_a_changed_config(tiny_config, tmp_path: Path, capsys) -> None:
    cfg = tiny_config(selection={"enabled": False}, val=None, train={"steps": 2})
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    code = main(
        ["train", "--config", str(cfg), "--out", str(run), "--resume", "--set", "train.lr=0.5", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "train.lr" in err and "--force" in err
    code = main(
        ["train", "--config", str(cfg), "--out", str(run), "--resume", "--set", "train.steps=1", "--no-progress"]
    )
    assert code == 2 and "smaller" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2  # exists, no --resume
    # --resume RUN_DIR alone reuses the stored config
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0


def test_whole_method_one_command(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(self_training={"rounds": 2, "steps": 2, "portion_step": 0.1})
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    for stage in ("stage1", "round1", "round2"):
        assert (run / stage / "selected.safetensors").is_file()
        assert list((run / stage / "checkpoints").glob("step_*.safetensors"))
    for k in (1, 2):
        pl = run / f"round{k}" / "pseudo_labels"
        assert (pl / "COMPLETE").is_file()
        stats = json.loads((pl / "stats.json").read_text())
        assert stats["portion"] == pytest.approx(0.5 + 0.1 * (k - 1))
        assert len(list(pl.glob("*.png"))) == 8
        assert not list(pl.rglob("*.npy"))
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 100.0 and len(metrics["per_class"]) == 7
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["stages"]) == {"stage1", "round1", "round2"}
    curves = json.loads((run / "curves.json").read_text())
    assert {"synthetic", "target"} <= set(curves[0]) and {c["stage"] for c in curves} == {"stage1", "round1", "round2"}
    assert (run / "figure4.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file() and (run / "log.txt").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_cuda_graphs_falls_back_to_the_eager_step_without_cuda(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(selection={"enabled": False}, val=None, train={"steps": 2})
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "eager"), "--no-progress"]) == 0
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "graphs"),
                "--no-progress",
                "--set",
                "runtime.cuda_graphs=true",
            ]
        )
        == 0
    )
    assert "runtime.cuda_graphs needs a single CUDA device" in (tmp_path / "graphs" / "log.txt").read_text()
    _assert_same(
        _weights(tmp_path / "eager/final/model.safetensors"), _weights(tmp_path / "graphs/final/model.safetensors")
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_training_matches_eager_training_on_cuda(tiny_config, tmp_path: Path) -> None:
    # the graphed trainer path, including a resume (fresh capture from restored optimiser state)
    cfg = tiny_config(
        selection={"enabled": False},
        val=None,
        train={"steps": 8, "checkpoint_every": 4},
        runtime={"device": "cuda", "amp": "none", "channels_last": False},
    )
    eager, graphs = tmp_path / "eager", tmp_path / "graphs"
    assert main(["train", "--config", str(cfg), "--out", str(eager), "--no-progress"]) == 0
    flag = ["--set", "runtime.cuda_graphs=true", "--no-progress"]
    assert main(["train", "--config", str(cfg), "--out", str(graphs), "--set", "train.steps=4", *flag]) == 0
    assert main(["train", "--config", str(cfg), "--out", str(graphs), "--resume", *flag]) == 0
    assert "needs a single CUDA device" not in (graphs / "log.txt").read_text()
    a, b = _weights(eager / "final/model.safetensors"), _weights(graphs / "final/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-3, atol=1e-4, msg=k)


def test_best_weights_from_an_abandoned_path_are_never_selected(tiny_config, tmp_path: Path) -> None:
    # a best snapshot newer than the checkpoint a stage resumes from (a rollback, or a kill
    # between an evaluation and the checkpoint after it) must not become the selected model

    cfg = tiny_config(self_training={"rounds": 0})
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    stage = run / "stage1"
    assert not list(stage.glob("best_step_*"))  # a finished stage keeps one best.safetensors
    best = read_meta(stage / "best.safetensors")
    assert best["step"] == read_meta(stage / "selected.safetensors")["step"]
    real = _weights(stage / "best.safetensors")
    bogus = {k: torch.zeros_like(v) for k, v in load_file(str(stage / "best.safetensors")).items()}
    save_checkpoint(stage / "best_step_00000099.safetensors", bogus, {**best, "step": 99})
    (stage / "selected.safetensors").unlink()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert not (stage / "best_step_00000099.safetensors").exists()
    _assert_same(_weights(stage / "selected.safetensors"), real)


def test_a_best_snapshot_outlives_a_better_one_until_a_checkpoint_records_it(tmp_path: Path) -> None:
    def _prune_best_files(folder, best):
        prune_best_files(StageDir(folder), best)

    def _find_best_file(folder, best):
        return find_best_file(StageDir(folder), best)

    def plant(step: int) -> Path:
        path = tmp_path / f"best_step_{step:08d}.safetensors"
        save_checkpoint(path, {"w": torch.full((1,), float(step))}, {"step": step})
        return path

    first, later = plant(3), plant(6)  # best at 3 (checkpointed at 4), a better one at 6
    # a rollback to the checkpoint of step 4 restores best = step 3: its file is still there
    _prune_best_files(tmp_path, {"step": 3})
    assert first.exists() and not later.exists()
    assert _find_best_file(tmp_path, {"step": 3}) == first
    # a checkpoint recording best = step 6 retires the older one
    later = plant(6)
    _prune_best_files(tmp_path, {"step": 6})
    assert later.exists() and not first.exists()
    assert _find_best_file(tmp_path, {"step": 3}) is None
    _prune_best_files(tmp_path, None)
    assert not list(tmp_path.glob("best_step_*"))
