"""Config mistakes: all of them at once, a line each with its key path and 'did you mean';
the blame on --set for a value that came from it; 'did you mean' for config file paths; an
unlabelled folder target that takes the source's class list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dast.cli import main
from dast.config import load_config, to_yaml
from dast.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dast/configs/demo.yaml"


def _errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


def test_three_mistakes_are_three_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: demo\ntrain:\n  stpes: 3\n  lr: fast\nmodel:\n  arch: resnet_101\n")
    lines = _errors(["train", "--config", str(bad), "--out", str(tmp_path / "run")], capsys)
    assert lines == [
        f"error: config key 'model.arch' in {bad}: input should be 'resnet101', 'vgg16', 'small' or 'timm', "
        "got 'resnet_101' (did you mean 'resnet101'?)",
        f"error: config key 'train.lr' in {bad}: input should be a valid number, unable to parse string as a "
        "number, got 'fast'",
        f"error: unknown config key 'train.stpes' in {bad} (did you mean 'train.steps'?)",
    ]
    assert not (tmp_path / "run").exists()


def test_mistakes_in_the_file_and_in_set_are_listed_together_each_blamed_on_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: demo\nselection:\n  num_imgs: 3\n")
    argv = ["train", "--config", str(bad), "--out", str(tmp_path / "run")]
    sets = ["--set", "train.steps=four", "--set", "adversarial.lamda_d=0.1", "--set", "seed"]
    lines = _errors([*argv, *sets], capsys)
    assert lines == [
        "error: unknown config key 'adversarial.lamda_d' in --set (did you mean 'adversarial.lambda_d'?)",
        "error: --set expects key=value, got 'seed'",
        "error: config key 'train.steps' in --set train.steps=four: input should be a valid integer, unable to "
        "parse string as an integer, got 'four'",
        f"error: unknown config key 'selection.num_imgs' in {bad} (did you mean 'selection.num_images'?)",
    ]


def test_a_mapping_set_from_the_command_line_is_blamed_for_its_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["train={steps: x}"])
    assert str(info.value) == (
        "config key 'train.steps' in --set train={steps: x}: input should be a valid integer, unable to parse "
        "string as an integer, got 'x'"
    )


def test_a_missing_config_file_suggests_the_file_next_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("mine.yaml").write_text(DEMO.read_text())
    for given in ("mine.yml", "mien.yaml"):
        (line,) = _errors(["train", "--config", given, "--out", "run", "--dry-run"], capsys)
        assert line == (
            f"error: config file not found: {given}: no such file and no packaged config of that name "
            "(did you mean 'mine.yaml'?)"
        )
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "exp1.yaml").write_text(DEMO.read_text())
    (line,) = _errors(["configs", "configs/exp.yaml"], capsys)
    assert line.endswith("(did you mean 'configs/exp1.yaml'?)")


def _folders(root: Path, target_classes: bool = False) -> None:
    """A labelled source with classes.yaml and an unlabelled target without one."""
    for sub in ("src/images", "src/labels", "tgt/images"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(root / f"src/images/{i}.png")
        Image.fromarray(rng.integers(0, 3, (32, 48), dtype=np.uint8)).save(root / f"src/labels/{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(root / f"tgt/images/{i}.jpg")
    classes = [{"name": "road", "color": [128, 64, 128]}, {"name": "sky", "color": [70, 130, 180]}, {"name": "car"}]
    (root / "src/classes.yaml").write_text(yaml.safe_dump(classes))
    if target_classes:
        (root / "tgt/classes.yaml").write_text(yaml.safe_dump(list(reversed(classes))))


def test_an_unlabelled_folder_target_takes_the_source_class_list(tmp_path: Path) -> None:
    _folders(tmp_path)
    tree = {
        "extends": str(DEMO),
        "model": {"num_classes": 3},
        "source": {"kind": "folder", "root": str(tmp_path / "src"), "size": [48, 32]},
        "target": {"kind": "folder", "root": str(tmp_path / "tgt"), "labels": None, "with_labels": False},
        "val": None,
    }
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.source.classes is None  # read from src/classes.yaml when the dataset is built
    assert cfg.target.classes is not None
    assert [(c.name, c.color) for c in cfg.target.classes] == [
        ("road", (128, 64, 128)),
        ("sky", (70, 130, 180)),
        ("car", (0, 0, 0)),
    ]
    assert "name: road" in to_yaml(cfg)  # the saved config says it explicitly
    # a target with its own classes.yaml keeps it (its labels are never read: the names do not matter)
    (tmp_path / "tgt/classes.yaml").write_text(yaml.safe_dump([{"name": "a"}, {"name": "b"}, {"name": "c"}]))
    assert load_config(tmp_path / "mine.yaml").target.classes is None
    # nothing is inherited when the source's list does not fit model.num_classes: the source's error says why
    (tmp_path / "tgt/classes.yaml").unlink()
    assert load_config(tmp_path / "mine.yaml", ["model.num_classes=4"]).target.classes is None
