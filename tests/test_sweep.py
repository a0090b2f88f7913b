"""`dast sweep` schedules ordinary `dast train` processes."""

from __future__ import annotations

from pathlib import Path

import yaml

from dast.cli import main


def test_sweep_runs_each_seed_and_resumes(tiny_config, tmp_path: Path, capsys) -> None:
    cfg = tiny_config(selection={"enabled": False}, val=None, train={"steps": 2})
    out = tmp_path / "sweep"
    assert (
        main(
            ["sweep", "--configs", str(cfg), "--seeds", "1", "2", "--out", str(out), "--gpus", "cpu", "--cpu-jobs", "2"]
        )
        == 0
    )
    for seed in (1, 2):
        run = out / f"{cfg.stem}_seed{seed}"
        assert (run / "final" / "model.safetensors").is_file()
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == seed
    capsys.readouterr()
    # a second sweep resumes (finds the runs complete) instead of refusing the existing folders
    assert main(["sweep", "--configs", str(cfg), "--seeds", "1", "--out", str(out), "--gpus", "cpu", "--dry-run"]) == 0
    assert "--resume" in capsys.readouterr().out


def test_sweep_missing_config_is_a_user_error(tmp_path: Path, capsys) -> None:
    assert main(["sweep", "--configs", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"), "--gpus", "cpu"]) == 2
    assert "config file not found" in capsys.readouterr().err
