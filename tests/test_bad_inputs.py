"""Bad input: every case of tests/bad_inputs/cases.yaml gives one readable `error:` line,
a non-zero exit, no traceback and no partial output; `on_corrupt: fail | skip` in training."""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dast.atomic
from dast.cli import main
from dast.config import load_config
from dast.data.datasets import build_dataset, with_label_dir
from dast.errors import DataError
from dast.models.io import ModelSpec, build_networks, save_networks

CORPUS = Path(__file__).parent / "bad_inputs"
CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS / "cases.yaml").read_text())
CLASSES = [
    {"name": "sky", "color": [70, 130, 180]},
    {"name": "road", "color": [128, 64, 128]},
    {"name": "car", "color": [0, 0, 142]},
]
TINY = {
    "seed": 3,
    "model": {"arch": "small", "num_classes": 7, "norm": "unit"},
    "source": {"kind": "synthetic", "domain": "source", "count": 4, "size": [64, 32]},
    "target": {"kind": "synthetic", "domain": "target", "count": 4, "size": [64, 32], "with_labels": False},
    "train": {
        "steps": 2,
        "poly_steps": 100,
        "lr": 0.01,
        "batch_size": 2,
        "num_workers": 0,
        "checkpoint_every": 2,
        "keep_last": 2,
        "eval_every": 2,
        "image_every": 100,
        "log_every": 1,
    },
    "self_training": {"rounds": 0, "steps": 2, "poly_steps": 100, "preview_count": 1},
    "selection": {"enabled": False},
    "runtime": {"device": "cpu"},
}


def _save_model(path: Path, num_classes: int, names: list[str] | None = None) -> None:
    torch.manual_seed(num_classes)
    spec = ModelSpec(
        arch="small",
        num_classes=num_classes,
        norm="unit",
        input_size=(64, 32),
        class_names=names or [],
        class_colors=[tuple(c["color"]) for c in CLASSES] if names else [],
    )
    save_networks(path, build_networks(spec))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The valid workspace every case starts from (see tests/bad_inputs/README.md)."""
    ws = tmp_path_factory.mktemp("template")
    rng = np.random.default_rng(1)
    for sub in ("ds/images", "ds/labels", "preds"):
        (ws / sub).mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(ws / "ds/images" / f"{name}.png")
        Image.fromarray(rng.integers(0, 3, (16, 24), dtype=np.uint8)).save(ws / "ds/labels" / f"{name}.png")
        Image.fromarray(rng.integers(0, 3, (16, 24), dtype=np.uint8)).save(ws / "preds" / f"{name}.png")
    (ws / "ds/classes.yaml").write_text(yaml.safe_dump(CLASSES))
    _save_model(ws / "ckpt3.safetensors", 3, [c["name"] for c in CLASSES])
    _save_model(ws / "ckpt7.safetensors", 7)
    (ws / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return ws


@pytest.fixture()
def workspace(template: Path, tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    folder = {
        "extends": "tiny.yaml",
        "model": {"num_classes": 3},
        "source": {"kind": "folder", "root": str(ws / "ds")},
        "target": {"kind": "folder", "root": str(ws / "ds"), "with_labels": False},
    }
    (ws / "folder.yaml").write_text(yaml.safe_dump(folder))
    return ws


def _fill(value: Any, ws: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{ws}", str(ws)).replace("{corpus}", str(CORPUS))
    if isinstance(value, list):
        return [_fill(v, ws) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ws) for k, v in value.items()}
    return value


class _FullDisk:
    """A file whose writes stop half-way with ENOSPC, like a disk that fills up."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fh.close()


def fill_disk_for(monkeypatch: pytest.MonkeyPatch, fragment: str) -> None:
    """Make dast.atomic's writes of files whose name contains ``fragment`` hit a full disk."""
    real_open = open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(file, mode, *args, **kwargs)
        if "w" in mode and fragment in os.fspath(file):
            return _FullDisk(fh)
        return fh

    monkeypatch.setattr(dast.atomic, "open", fake_open, raising=False)


def _setup(steps: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    for step in steps:
        ((op, arg),) = step.items()
        if op == "copy":
            Path(arg["to"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(arg["from"], arg["to"])
        elif op == "remove":
            p = Path(arg)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif op == "write":
            Path(arg["to"]).parent.mkdir(parents=True, exist_ok=True)
            Path(arg["to"]).write_text(arg["text"])
        elif op == "truncate":
            os.truncate(arg["path"], int(arg["size"]))
        elif op == "enospc":
            fill_disk_for(monkeypatch, arg)
        else:
            raise AssertionError(f"unknown setup step {op!r}")


def snapshot(path: Path) -> Any:
    """None when absent; the bytes of a file; {relative path: bytes or None for folders}."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, expect: list[str]) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in expect:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_corpus_is_large_and_distinct() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) >= 15 and len(set(names)) == len(names)
    commands = {c["argv"][0] for c in CASES}
    assert {"train", "evaluate", "predict", "pseudo-label", "export"} <= commands


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input(
    case: dict[str, Any], workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    case = _fill(case, workspace)
    _setup(case.get("setup", []), monkeypatch)
    output = Path(case["output"])
    before = snapshot(output)
    code, _, err = run_cli(case["argv"], capsys)
    assert code != 0, err
    assert_one_error_line(err, case["expect"])
    assert snapshot(output) == before, f"{output} was left changed"
    assert not list(workspace.rglob(f"*{dast.atomic.TMP_MARK}*")), "temporary files left behind"


def test_debug_shows_the_traceback(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["--debug", "train", "--config", str(workspace / "nope.yaml"), "--out", str(workspace / "run")], capsys
    )
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: config file not found")


# --------------------------------------------------------------------------- on_corrupt in training


def _corrupt_training_set(ws: Path) -> None:
    shutil.copyfile(CORPUS / "corrupt.png", ws / "ds/images/b.png")


def test_on_corrupt_fail_stops_training_naming_the_file(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _corrupt_training_set(workspace)
    run = workspace / "run"
    # read in a DataLoader worker process: the error still arrives as one line
    code, _, err = run_cli(
        [
            "train",
            "--config",
            str(workspace / "folder.yaml"),
            "--out",
            str(run),
            "--set",
            "train.num_workers=1",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2
    assert_one_error_line(err, ["cannot read image", str(workspace / "ds/images/b.png")])
    assert not run.exists()
    # the failed stage shut its loader workers down: none is left to block the interpreter's exit
    assert not multiprocessing.active_children()


def test_on_corrupt_skip_logs_and_trains_on(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _corrupt_training_set(workspace)
    run = workspace / "run"
    code, _, err = run_cli(
        [
            "train",
            "--config",
            str(workspace / "folder.yaml"),
            "--out",
            str(run),
            "--set",
            "source.on_corrupt=skip",
            "--set",
            "target.on_corrupt=skip",
            "--set",
            "train.num_workers=1",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    log = (run / "log.txt").read_text()
    skipped = [line for line in log.splitlines() if "skipping unreadable sample b" in line]
    assert skipped and all(str(workspace / "ds/images/b.png") in line for line in skipped)
    assert (run / "final" / "model.safetensors").is_file()


def test_on_corrupt_skip_leaves_the_unreadable_target_image_out_of_self_training(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _corrupt_training_set(workspace)
    run = workspace / "run"
    code, _, err = run_cli(
        [
            "train",
            "--config",
            str(workspace / "folder.yaml"),
            "--out",
            str(run),
            "--set",
            "source.on_corrupt=skip",
            "--set",
            "target.on_corrupt=skip",
            "--set",
            "self_training.rounds=1",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    labels = run / "round1" / "pseudo_labels"
    names = sorted(p.stem for p in (workspace / "ds/images").glob("*.png"))
    stats = yaml.safe_load((labels / "stats.json").read_text())
    # every readable image labelled once under its own name; the unreadable one excused
    assert stats["skipped"] == ["b"]
    assert stats["num_images"] == len(names) - 1
    assert sorted(p.stem for p in labels.glob("*.png")) == [n for n in names if n != "b"]
    assert (run / "final" / "model.safetensors").is_file()
    # with on_corrupt: fail the same folder is incomplete

    cfg = load_config(workspace / "folder.yaml")
    target = build_dataset(cfg.target, norm="unit", num_classes=3, with_labels=False)
    with pytest.raises(DataError, match="pseudo label missing: .*b.png"):
        with_label_dir(target, labels)


def test_a_fresh_run_that_fails_late_keeps_its_checkpoints(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The clean-up of a failed fresh run never removes trained weights."""
    fill_disk_for(monkeypatch, "selected.safetensors")
    run = workspace / "run"
    code, _, err = run_cli(
        ["train", "--config", str(workspace / "tiny.yaml"), "--out", str(run), "--no-progress"], capsys
    )
    assert code == 2
    assert_one_error_line(err, ["no space left on device", str(run / "stage1" / "selected.safetensors")])
    assert (run / "stage1" / "checkpoints" / "step_00000002.safetensors").is_file()
    assert not (run / "stage1" / "selected.safetensors").exists()
    monkeypatch.undo()
    code, _, err = run_cli(["train", "--resume", str(run), "--no-progress"], capsys)
    assert code == 0, err
    assert (run / "final" / "model.safetensors").is_file()


def test_tiny_template_is_valid(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cases' failures come from their one broken piece: the untouched workspace works."""
    code, out, err = run_cli(
        [
            "evaluate",
            "--dataset",
            "folder",
            "--root",
            str(workspace / "ds"),
            "--checkpoint",
            str(workspace / "ckpt3.safetensors"),
            "--out",
            str(workspace / "out"),
            "--device",
            "cpu",
            "--quiet",
            "--workers",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(
        [
            "evaluate",
            "--dataset",
            "folder",
            "--root",
            str(workspace / "ds"),
            "--predictions",
            str(workspace / "preds"),
            "--out",
            str(workspace / "out2"),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(
        [
            "predict",
            "--checkpoint",
            str(workspace / "ckpt3.safetensors"),
            "--input",
            str(workspace / "ds/images"),
            "--out",
            str(workspace / "pred_out"),
            "--device",
            "cpu",
            "--no-progress",
            "--workers",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(
        [
            "pseudo-label",
            "--checkpoint",
            str(workspace / "ckpt7.safetensors"),
            "--config",
            str(workspace / "tiny.yaml"),
            "--out",
            str(workspace / "pl"),
            "--device",
            "cpu",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(
        ["train", "--config", str(workspace / "folder.yaml"), "--out", str(workspace / "run"), "--no-progress"], capsys
    )
    assert code == 0, err
