"""Safe loading: a checkpoint crafted to run code when unpickled is refused by every path
that loads weights, and nothing of it runs.

The payload's ``__reduce__`` makes unpickling call ``exec`` with code that creates a marker
file; the control test shows that an unsafe load really would create it.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dast.cli import main
from dast.models.convert import dast_to_official
from dast.models.io import ModelSpec, build_networks

TINY = {
    "seed": 1,
    "model": {"arch": "small", "num_classes": 7, "norm": "unit"},
    "source": {"kind": "synthetic", "domain": "source", "count": 2, "size": [64, 32]},
    "target": {"kind": "synthetic", "domain": "target", "count": 2, "size": [64, 32], "with_labels": False},
    "train": {"steps": 2, "batch_size": 1, "num_workers": 0, "checkpoint_every": 1},
    "self_training": {"steps": 1},
    "selection": {"enabled": False},
    "runtime": {"device": "cpu"},
}


class _Payload:
    """Unpickling this calls ``exec(code)``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (self.code,))


@pytest.fixture()
def evil(tmp_path: Path) -> dict[str, Path]:
    """Crafted files and the marker their code would create."""
    marker = tmp_path / "PWNED"
    payload = _Payload(f"open({str(marker)!r}, 'w').close()")
    files = {"marker": marker}
    files["zip"] = tmp_path / "evil.pth"  # torch.save's zip container
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1), "hook": payload}}, files["zip"])
    files["pickle"] = tmp_path / "evil_legacy.pth"  # a bare pickle stream
    files["pickle"].write_bytes(pickle.dumps({"conv1.weight": payload}, protocol=2))
    files["renamed"] = tmp_path / "evil.safetensors"  # a .pth renamed to .safetensors
    shutil.copyfile(files["zip"], files["renamed"])
    return files


@pytest.fixture()
def place(tmp_path: Path) -> Path:
    """A valid tiny config and a one-image folder dataset, so only the checkpoint is bad."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "labels").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(ds / "images" / "a.png")
    Image.fromarray(rng.integers(0, 7, (32, 64), dtype=np.uint8)).save(ds / "labels" / "a.png")
    (ds / "classes.yaml").write_text(yaml.safe_dump([{"name": f"c{i}", "color": [i, i, i]} for i in range(7)]))
    return tmp_path


def test_control_the_payload_runs_when_unpickled_unsafely(evil: dict[str, Path]) -> None:
    torch.load(evil["zip"], weights_only=False)
    assert evil["marker"].exists()
    evil["marker"].unlink()
    with open(evil["pickle"], "rb") as fh:
        pickle.load(fh)
    assert evil["marker"].exists()


def _official_segmentor(path: Path) -> None:
    seg, _ = dast_to_official(
        build_networks(
            ModelSpec(
                arch="small", num_classes=7, variant="reference", discoverer=False, corrector=False, attention=False
            )
        )
    )
    torch.save(seg, path)


def _commands(tmp: Path, bad: Path) -> dict[str, list[str]]:
    ds, cfg = str(tmp / "ds"), str(tmp / "tiny.yaml")
    return {
        "train-init": [
            "train",
            "--config",
            cfg,
            "--out",
            str(tmp / "run"),
            "--set",
            f"model.init={bad}",
            "--no-progress",
        ],
        "evaluate": [
            "evaluate",
            "--dataset",
            "folder",
            "--root",
            ds,
            "--checkpoint",
            str(bad),
            "--out",
            str(tmp / "ev"),
            "--device",
            "cpu",
            "--quiet",
            "--workers",
            "0",
        ],
        "predict": [
            "predict",
            "--checkpoint",
            str(bad),
            "--input",
            f"{ds}/images",
            "--out",
            str(tmp / "pred"),
            "--device",
            "cpu",
            "--no-progress",
            "--workers",
            "0",
        ],
        "export": ["export", "--checkpoint", str(bad), "--out", str(tmp / "m.onnx")],
        "pseudo-label": [
            "pseudo-label",
            "--checkpoint",
            str(bad),
            "--config",
            cfg,
            "--out",
            str(tmp / "pl"),
            "--device",
            "cpu",
            "--no-progress",
        ],
        "convert-official": [
            "convert",
            "official",
            "--segmentor",
            str(bad),
            "--arch",
            "small",
            "--num-classes",
            "7",
            "--out",
            str(tmp / "conv.safetensors"),
        ],
        "convert-official-discriminators": [
            "convert",
            "official",
            "--segmentor",
            str(tmp / "seg.pth"),
            "--discriminators",
            str(bad),
            "--arch",
            "small",
            "--num-classes",
            "7",
            "--out",
            str(tmp / "conv.safetensors"),
        ],
        "convert-imagenet": [
            "convert",
            "imagenet",
            "--weights",
            str(bad),
            "--arch",
            "small",
            "--num-classes",
            "7",
            "--out",
            str(tmp / "conv.safetensors"),
        ],
    }


def _assert_refused(code: int, err: str, bad: Path, marker: Path) -> None:
    assert not marker.exists(), "the crafted checkpoint's code ran"
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(bad) in lines[0], err
    assert any(w in lines[0] for w in ("not a dast checkpoint", "refusing to load", "not a readable safetensors")), (
        lines[0]
    )


COMMANDS = list(_commands(Path("."), Path("x")))


@pytest.mark.parametrize("variant", ["zip", "pickle", "renamed"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_loading_path_refuses_the_crafted_file(
    command: str, variant: str, evil: dict[str, Path], place: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if command == "convert-official-discriminators":
        _official_segmentor(place / "seg.pth")
    bad = evil[variant]
    code = main(_commands(place, bad)[command])
    _assert_refused(code, capsys.readouterr().err, bad, evil["marker"])
    for out in ("run", "ev", "pred", "m.onnx", "pl", "conv.safetensors"):
        assert not (place / out).exists(), out


@pytest.mark.parametrize("where", ["checkpoint", "selected"])
def test_resume_refuses_a_crafted_file_in_the_run_directory(
    where: str, evil: dict[str, Path], place: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --resume` with the crafted file as the latest checkpoint of stage 1, or as
    the selected model of a completed stage 1 that the next round starts from."""
    run = place / "run"
    assert main(["train", "--config", str(place / "tiny.yaml"), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    if where == "checkpoint":  # the latest checkpoint of a stage 1 that is then made longer
        bad = run / "stage1" / "checkpoints" / "step_00000002.safetensors"
        args = [
            "train",
            "--config",
            str(place / "tiny.yaml"),
            "--out",
            str(run),
            "--resume",
            "--set",
            "train.steps=3",
            "--no-progress",
        ]
    else:
        bad = run / "stage1" / "selected.safetensors"
        args = [
            "train",
            "--config",
            str(place / "tiny.yaml"),
            "--out",
            str(run),
            "--resume",
            "--set",
            "self_training.rounds=1",
            "--no-progress",
        ]
    shutil.copyfile(evil["zip"], bad)
    code = main(args)
    _assert_refused(code, capsys.readouterr().err, bad, evil["marker"])
