"""The errors of a new user's first hour: an unlabelled folder for check-data, an empty image
folder, a run directory given as a checkpoint, every unknown label colour at once, and the
folders `dast init-config` is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dast.cli import main
from dast.config import load_config
from dast.config_template import smoke_size
from dast.data.label_convert import UnknownColours
from dast.models.io import ModelSpec, build_networks, save_networks

CLASSES = [{"name": "road", "color": [128, 64, 128]}, {"name": "sky", "color": [70, 130, 180]}]


def _images(folder: Path, n: int, size: tuple[int, int] = (40, 24), suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 30 * i, np.uint8)).save(folder / f"im{i}{suffix}")


def _labels(folder: Path, n: int, size: tuple[int, int] = (40, 24)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0]), i % 2, np.uint8)).save(folder / f"im{i}.png")


def test_check_data_on_an_unlabelled_folder_says_so_and_suggests_no_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _images(tmp_path / "cam" / "images", 2, suffix=".jpg")
    assert main(["check-data", "--dataset", "folder", "--root", str(tmp_path / "cam"), "--no-progress"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"missing label folder: {tmp_path / 'cam' / 'labels'} (the images were checked without labels; for an "
        "unlabelled dataset, such as a target domain, pass --no-labels)",
        f"1 problem(s) found (2 images, 0 labels checked in {tmp_path / 'cam'})",
    ]
    argv = ["check-data", "--dataset", "folder", "--root", str(tmp_path / "cam"), "--no-labels", "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"ok: no problems (2 images, 0 labels checked in {tmp_path / 'cam'})\n"


def test_check_data_on_an_empty_image_folder_is_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cam" / "images").mkdir(parents=True)
    (tmp_path / "cam" / "images" / "notes.txt").write_text("not an image")
    argv = ["check-data", "--dataset", "folder", "--root", str(tmp_path / "cam"), "--no-labels", "--no-progress"]
    assert main(argv) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"no images in {tmp_path / 'cam' / 'images'} (looked for png/jpg/jpeg files)",
        f"1 problem(s) found (0 images, 0 labels checked in {tmp_path / 'cam'})",
    ]


def test_check_data_names_a_relative_root_absolutely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["check-data", "--dataset", "folder", "--root", "my_render"]) == 2
    assert capsys.readouterr().err == (
        "error: dataset root not found: my_render (--root; relative roots start at the working directory: "
        f"{tmp_path / 'my_render'})\n"
    )


def test_a_run_directory_stands_for_its_final_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    _images(tmp_path / "in", 1)
    spec = ModelSpec(arch="small", num_classes=2, norm="unit", input_size=(40, 24))
    save_networks(run / "stage1" / "selected.safetensors", build_networks(spec))
    argv = ["predict", "--checkpoint", str(run), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "p")]
    # unfinished: the error names what is missing and the newest snapshot there is
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"error: run directory {run} has no final model ({run / 'final' / 'model.safetensors'} is missing: the "
        f"run is not finished); its newest selected snapshot is {run / 'stage1' / 'selected.safetensors'}\n"
    )
    assert not (tmp_path / "p").exists()
    (run / "final").mkdir()
    save_networks(run / "final" / "model.safetensors", build_networks(spec))
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().err == f"note: using the run's final model {run / 'final' / 'model.safetensors'}\n"
    assert (tmp_path / "p" / "im0.png").is_file()
    # a folder that is no run directory
    assert main([*argv[:2], str(tmp_path / "in"), *argv[3:], "--device", "cpu"]) == 2
    assert "is a directory, not a file" in capsys.readouterr().err


def test_many_unknown_colours_are_summed_up_after_the_most_frequent() -> None:
    found = {f"f{i}.png": {(i, i, i): 100 - i, (200, 0, 0): 10} for i in range(14)}
    message = str(UnknownColours(found, "classes.yaml"))
    # the most frequent first: (200, 0, 0) with 14 x 10 pixels in every file, then (0, 0, 0) .. (10, 10, 10);
    # (11, 11, 11) .. (13, 13, 13) are counted: 89 + 88 + 87 pixels
    assert message.startswith(
        "15 colours not in classes.yaml: (200, 0, 0) 140 pixels in 14 files (f0.png, f1.png, ...); "
        "(0, 0, 0) 100 pixels in f0.png; (1, 1, 1) 99 pixels in f1.png; "
    )
    assert "; (10, 10, 10) 90 pixels in f10.png; and 3 more colours (264 pixels; many rare colours usually " in message
    flags = " ".join(f"--ignore-color {i},{i},{i}" for i in range(11))
    assert message.endswith(f"add them to classes.yaml or pass --ignore-color 200,0,0 {flags}")
    one = str(UnknownColours({"a.png": {(1, 2, 3): 1}}, "classes.yaml"))
    assert one == (
        "colour not in classes.yaml: (1, 2, 3) 1 pixel in a.png; add it to classes.yaml or pass --ignore-color 1,2,3"
    )


def _source(root: Path, labels: bool = True, colour: bool = False) -> Path:
    _images(root / "images", 3, size=(1280, 720))
    if labels:
        _labels(root / "labels", 3, size=(1280, 720))
    if colour:
        (root / "labels_colour").mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump(CLASSES))
    return root


def test_init_config_writes_a_config_that_loads_and_says_what_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _source(tmp_path / "renders")
    _images(tmp_path / "cam" / "images", 2, size=(1024, 512), suffix=".jpg")
    _images(tmp_path / "camval" / "images", 2, size=(1024, 512))
    _labels(tmp_path / "camval" / "labels", 2, size=(1024, 512))
    argv = ["init-config", "--source", "renders", "--target", "cam", "--val", "camval", "--out", "mine.yaml"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "wrote mine.yaml: 2 classes (road, sky), dast's small network",
        "next: dast train --config mine.yaml --out runs/mine --dry-run",
    ]
    text = Path("mine.yaml").read_text()
    assert text.startswith("# A dast training config for your own folders, written by `dast init-config`")
    cfg = load_config("mine.yaml")
    assert (cfg.model.arch, cfg.model.num_classes) == ("small", 2)
    assert (cfg.source.root, cfg.target.root, cfg.val.root if cfg.val else None) == ("renders", "cam", "camval")
    assert (cfg.source.size, cfg.target.size) == ((512, 288), (512, 256))  # at most 512 wide, the aspect kept
    assert cfg.target.with_labels is False and cfg.target.labels is None
    assert [c.name for c in cfg.target.classes or []] == ["road", "sky"]  # the source's
    assert "  num_classes: 2            # renders/classes.yaml: road, sky" in text
    # it is not overwritten without --force
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: mine.yaml exists; pass --force to replace it\n"
    assert main([*argv, "--force", "--steps", "20"]) == 0
    assert load_config("mine.yaml").train.steps == 20


@pytest.mark.parametrize(
    ("setup", "want"),
    [
        ("no_classes", "class list not found: renders/classes.yaml; write it"),
        (
            "colour_labels_only",
            "has no label folder renders/labels; convert the colour labels first: dast convert labels",
        ),
        ("no_target", "dataset root not found: cam (--target; relative roots start at the working directory: "),
        ("empty_target", "the target folder cam has no images in cam/images (png/jpg/jpeg files)"),
    ],
)
def test_init_config_refuses_folders_it_cannot_use(
    setup: str, want: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _source(tmp_path / "renders", labels=setup != "colour_labels_only", colour=setup == "colour_labels_only")
    if setup == "no_classes":
        (tmp_path / "renders" / "classes.yaml").unlink()
    if setup != "no_target":
        (tmp_path / "cam" / "images").mkdir(parents=True)
        if setup != "empty_target":
            _images(tmp_path / "cam" / "images", 1)
    assert main(["init-config", "--source", "renders", "--target", "cam", "--out", "mine.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and want in err and len(err.splitlines()) == 1
    assert not (tmp_path / "mine.yaml").exists()


def test_smoke_sizes_keep_the_aspect_ratio_in_multiples_of_8() -> None:
    assert smoke_size((1914, 1052)) == (512, 280)
    assert smoke_size((2048, 1024)) == (512, 256)
    assert smoke_size((64, 48)) == (64, 48)
    assert smoke_size((30, 20)) == (32, 32)  # the corrector needs 32 pixels on each side
