"""The one definition of the run directory: names, patterns, stage order, final choice."""

from __future__ import annotations

from pathlib import Path

import torch

from dast.checkpoint import save_checkpoint
from dast.rundir import CHECKPOINT_RE, RunDir, checkpoint_name, numbered_files, round_name
from dast.training.snapshots import best_across_stages


def test_checkpoint_names_round_trip_at_eight_or_more_digits(tmp_path: Path) -> None:
    assert checkpoint_name(42) == "step_00000042.safetensors"
    assert checkpoint_name(123_456_789) == "step_123456789.safetensors"
    for name in (checkpoint_name(7), checkpoint_name(123_456_789), "step_42.safetensors", "step_00000007.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert [s for s, _ in numbered_files(tmp_path, CHECKPOINT_RE)] == [7, 123_456_789]


def test_stage_names_are_in_training_order(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for name in ("round10", "final", "round2", "stage1", "tb", "round1"):
        (tmp_path / name).mkdir()
    assert run.stage_names() == ["stage1", "round1", "round2", "round10"]
    assert run.round(3).pseudo_labels == tmp_path / round_name(3) / "pseudo_labels"


def test_best_across_stages_picks_the_highest_selection_score(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for name, value in (("stage1", 41.4), ("round1", 37.2), ("round2", None)):
        run.stage(name).root.mkdir()
        sel = {"step": 5, "value": value, "key": "synthetic"} if value is not None else None
        save_checkpoint(run.stage(name).selected, {"w": torch.zeros(1)}, {"selection": sel})
    path, name, value = best_across_stages(run)  # type: ignore[misc]
    assert (name, value) == ("stage1", 41.4) and path == run.stage("stage1").selected
    assert best_across_stages(RunDir(tmp_path / "empty")) is None
