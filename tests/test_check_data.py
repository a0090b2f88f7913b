"""``dast check-data``: every problem listed in one pass, exit codes, error messages."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dast.cli import main
from dast.data.check import check_dataset

W, H = 10, 6


def _img(path: Path, w: int = W, h: int = H) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def _palette_label(path: Path, value: int = 7, w: int = W, h: int = H) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.full((h, w), value, np.uint8))
    img.putpalette([0, 0, 0] * 256)
    img.save(path)


def make_gta5(root: Path) -> None:
    for k in range(1, 4):
        _img(root / "images" / f"{k:05d}.png")
        _palette_label(root / "labels" / f"{k:05d}.png")


def test_clean_dataset_exits_zero(tmp_path, capsys):
    make_gta5(tmp_path)
    assert check_dataset("gta5", tmp_path) == []
    assert main(["check-data", "--dataset", "gta5", "--root", str(tmp_path), "--quiet"]) == 0
    assert "ok: no problems (3 images, 3 labels checked" in capsys.readouterr().out


def test_every_problem_is_listed_in_one_pass(tmp_path, capsys):
    make_gta5(tmp_path)
    _img(tmp_path / "images" / "00004.png")  # no label
    good = (tmp_path / "images" / "00002.png").read_bytes()
    (tmp_path / "images" / "00002.png").write_bytes(good[: len(good) // 2])  # corrupt PNG
    _palette_label(tmp_path / "labels" / "00003.png", value=40)  # outside the label ids 0..33
    _img(tmp_path / "images" / "00005.png", w=W + 2)  # size mismatch
    _palette_label(tmp_path / "labels" / "00005.png")
    _img(tmp_path / "labels" / "00006.png")  # an RGB colour label ...
    _img(tmp_path / "images" / "00006.png")
    _palette_label(tmp_path / "labels" / "00009.png")  # ... and a label without image
    rc = main(["check-data", "--dataset", "gta5", "--root", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    expect = [
        "image without label: {r}/images/00004.png (expected {r}/labels/00004.png)",
        "cannot read image {r}/images/00002.png",
        "label {r}/labels/00003.png has value(s) 40 outside 0..33",
        "size mismatch: image {r}/images/00005.png is 12x6 but label {r}/labels/00005.png is 10x6",
        "expected a single-channel label image, got RGB: {r}/labels/00006.png",
        "label without image: {r}/labels/00009.png",
    ]
    for e in expect:
        line = e.format(r=tmp_path)
        assert any(o.startswith(line) for o in out), (line, out)
    assert out[-1].startswith("6 problem(s) found (6 images, 5 labels checked")


def test_missing_root_is_a_user_error(tmp_path, capsys):
    rc = main(["check-data", "--dataset", "cityscapes", "--root", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: dataset root not found:") and "nope" in err


def test_cityscapes_missing_folders_and_list_entries(tmp_path):
    root = tmp_path / "cs"
    _img(root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")
    problems = check_dataset("cityscapes", root, "val")
    assert problems == [f"missing label folder: {root}/gtFine/val"]
    lab = root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png"
    lab.parent.mkdir(parents=True)
    Image.fromarray(np.full((H, W), 26, np.uint8)).save(lab)
    lst = tmp_path / "val.txt"
    lst.write_text("lindau/lindau_000000_000019_leftImg8bit.png\nlindau/lindau_000000_000020_leftImg8bit.png\n")
    assert check_dataset("cityscapes", root, "val", list_file=lst) == [
        f"{lst}:2: 'lindau/lindau_000000_000020_leftImg8bit.png' has no image in {root}/leftImg8bit/val"
    ]
    assert check_dataset("cityscapes", root, "train") == [
        f"missing image folder: {root}/leftImg8bit/train",
        f"missing label folder: {root}/gtFine/train",
    ]


def test_synthia_encoding_and_id_range(tmp_path):
    (tmp_path / "GT" / "LABELS").mkdir(parents=True)
    for name in ("a", "b", "c"):
        _img(tmp_path / "RGB" / f"{name}.png")
    good = np.zeros((H, W, 3), np.uint16)
    good[:, :, 2] = 3
    cv2.imwrite(str(tmp_path / "GT" / "LABELS" / "a.png"), good)
    bad = good.copy()
    bad[0, 0, 2] = 30
    cv2.imwrite(str(tmp_path / "GT" / "LABELS" / "b.png"), bad)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "GT" / "LABELS" / "c.png")
    problems = check_dataset("synthia", tmp_path)
    assert len(problems) == 2
    assert problems[0] == f"label {tmp_path}/GT/LABELS/b.png has value(s) 30 outside 0..22"
    assert "single-channel" in problems[1] and problems[1].endswith("c.png")


def test_folder_dataset_uses_classes_yaml(tmp_path, capsys):
    _img(tmp_path / "images" / "x.jpg")
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.full((H, W), 3, np.uint8)).save(tmp_path / "labels" / "x.png")
    (tmp_path / "classes.yaml").write_text("- {name: a, color: [1, 2, 3]}\n- {name: b, color: [4, 5, 6]}\n")
    assert check_dataset("folder", tmp_path) == [f"label {tmp_path}/labels/x.png has value(s) 3 outside 0..1 or 255"]
    assert main(["check-data", "--dataset", "folder", "--root", str(tmp_path), "--quiet"]) == 1
    assert main(["check-data", "--dataset", "folder", "--root", str(tmp_path), "--num-classes", "4", "--quiet"]) == 0
    assert main(["check-data", "--dataset", "folder", "--root", str(tmp_path), "--no-labels", "--quiet"]) == 0
    capsys.readouterr()
