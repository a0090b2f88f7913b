"""``dast convert labels``: colour label PNGs -> class-index PNGs, and check-data's hint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dast.cli import main
from dast.data.check import check_dataset
from dast.data.label_convert import colour_lookup, colours_to_index, convert_label_folder, encode_rgb, parse_rgb
from dast.data.labels import ClassTable, read_class_file
from dast.data.readers import read_index_label
from dast.errors import ConfigError, DataError, UserError

COLOURS = [(128, 64, 128), (0, 0, 142), (70, 130, 180)]
NAMES = ["road", "car", "sky"]
H, W = 6, 9


def _classes(path: Path, colours=COLOURS, names=NAMES) -> Path:
    path.write_text("".join(f"- {{name: {n}, color: [{c[0]}, {c[1]}, {c[2]}]}}\n" for n, c in zip(names, colours)))
    return path


def _index_maps(n: int, seed: int = 0, with_ignore: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = {}
    for k in range(n):
        m = rng.integers(0, len(COLOURS), (H, W)).astype(np.uint8)
        if with_ignore:
            m[0, : k + 1] = 255
        maps[f"frame_{k:03d}"] = m
    return maps


def _paint(index: np.ndarray, ignore_colour=(0, 0, 0)) -> np.ndarray:
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(COLOURS)] = COLOURS
    palette[255] = ignore_colour
    return palette[index]


def _colour_folder(folder: Path, maps: dict[str, np.ndarray], ignore_colour=(0, 0, 0)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in maps.items():
        Image.fromarray(_paint(m, ignore_colour)).save(folder / f"{name}.png")


def _cli(*args: str) -> int:
    return main(["convert", "labels", "--no-progress", *args])


def test_round_trip_with_an_ignore_colour_reproduces_the_index_maps(tmp_path, capsys):
    maps = _index_maps(4)
    _colour_folder(tmp_path / "colour", maps, ignore_colour=(0, 0, 0))
    classes = _classes(tmp_path / "classes.yaml")
    out = tmp_path / "index"
    rc = _cli("--classes", str(classes), "--in", str(tmp_path / "colour"), "--out", str(out), "--ignore-color", "0,0,0")
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in maps)
    for name, m in maps.items():
        img = Image.open(out / f"{name}.png")
        assert img.mode == "L"  # single-channel uint8
        assert np.array_equal(np.asarray(img), m)
        assert np.array_equal(read_index_label(out / f"{name}.png", 3), m)  # what folder datasets read
    printed = capsys.readouterr().out
    ignored = sum(int((m == 255).sum()) for m in maps.values())
    total = len(maps) * H * W
    assert (
        f"converted 4 label files into {out}: 3 classes, {100 * ignored / total:.1f}% of the pixels ignored" in printed
    )
    road = sum(int((m == 0).sum()) for m in maps.values())
    assert f"road {100 * road / total:.1f}%" in printed
    # no temporary folder is left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.yaml", "colour", "index"]


def test_repeated_ignore_colours_and_palette_and_opaque_rgba_inputs(tmp_path):
    index = np.array([[0, 1, 2, 255, 255]], np.uint8)
    colours = np.array([COLOURS[0], COLOURS[1], COLOURS[2], (255, 255, 255), (1, 2, 3)], np.uint8)[None]
    src = tmp_path / "in"
    src.mkdir()
    # palette PNG: the stored indices are not the class indices, the palette colours are what counts
    pal = Image.fromarray(np.array([[4, 3, 2, 1, 0]], np.uint8), mode="P")
    flat = [0] * 768
    for i, c in enumerate(colours[0][::-1]):
        flat[3 * i : 3 * i + 3] = [int(v) for v in c]
    pal.putpalette(flat)
    pal.save(src / "p.png")
    assert Image.open(src / "p.png").mode == "P"
    rgba = np.concatenate([colours, np.full((1, 5, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(src / "a.png")
    Image.fromarray(colours).save(src / "c.PNG")
    (src / "notes.txt").write_text("not a label")
    table = read_class_file(_classes(tmp_path / "classes.yaml"))
    done = convert_label_folder(table, src, tmp_path / "out", ignore=[(255, 255, 255), (1, 2, 3)], progress=False)
    assert done.files == 3 and done.ignored == 6 and done.pixels.tolist() == [3, 3, 3]
    for name in ("p.png", "a.png", "c.PNG"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / name)), index), name
    assert not (tmp_path / "out" / "notes.txt").exists()


def test_every_unknown_colour_of_every_file_is_listed_in_one_line_exit_2_and_nothing_is_written(tmp_path, capsys):
    maps = _index_maps(5, with_ignore=False)
    _colour_folder(tmp_path / "labels", maps)
    bad = _paint(maps["frame_003"])
    bad[1:4, 2:7] = (12, 34, 56)  # 15 pixels
    bad[5, 0] = (9, 9, 9)
    Image.fromarray(bad).save(tmp_path / "labels" / "frame_003.png")
    also = _paint(maps["frame_001"])
    also[0, 0:3] = (12, 34, 56)  # 3 more pixels of the same colour, in another file
    Image.fromarray(also).save(tmp_path / "labels" / "frame_001.png")
    classes = _classes(tmp_path / "classes.yaml")
    out = tmp_path / "new" / "index"
    rc = _cli("--classes", str(classes), "--in", str(tmp_path / "labels"), "--out", str(out), "--workers", "2")
    err = capsys.readouterr().err
    assert rc == 2
    labels = tmp_path / "labels"
    assert err == (
        f"error: 2 colours not in {classes}: (12, 34, 56) 18 pixels in {labels}/frame_001.png and "
        f"{labels}/frame_003.png; (9, 9, 9) 1 pixel in {labels}/frame_003.png; add them to {classes} or pass "
        "--ignore-color 12,34,56 --ignore-color 9,9,9\n"
    )
    # neither the output, nor its new parent, nor a temporary folder stays behind
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.yaml", "labels"]


def test_existing_output_is_refused_unless_force_which_replaces_it(tmp_path, capsys):
    _colour_folder(tmp_path / "labels", _index_maps(2, with_ignore=False))
    classes = str(_classes(tmp_path / "classes.yaml"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")
    args = ("--classes", classes, "--in", str(tmp_path / "labels"), "--out", str(out))
    assert _cli(*args) == 2
    assert capsys.readouterr().err == f"error: output folder {out} is not empty; pass --force to replace it\n"
    assert (out / "stale.png").read_bytes() == b"old"
    assert _cli(*args, "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["frame_000.png", "frame_001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.yaml", "labels", "out"]
    # an empty existing folder is fine without --force; --out == --in is refused
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("--classes", classes, "--in", str(tmp_path / "labels"), "--out", str(empty)) == 0
    assert (
        _cli("--classes", classes, "--in", str(tmp_path / "labels"), "--out", str(tmp_path / "labels"), "--force") == 2
    )
    assert "--out must differ from --in" in capsys.readouterr().err
    assert _cli("--classes", classes, "--in", str(tmp_path / "labels"), "--out", str(tmp_path), "--force") == 2
    assert "contains --in" in capsys.readouterr().err


def test_bad_class_lists_colours_and_images(tmp_path, capsys):
    same = ClassTable(("a", "b"), ((1, 2, 3), (1, 2, 3)))
    with pytest.raises(ConfigError, match=r"classes 'a' and 'b' share the colour \(1, 2, 3\)"):
        colour_lookup(same)
    with pytest.raises(ConfigError, match=r"ignore colour \(4, 5, 6\) is the colour of class 'b'"):
        colour_lookup(ClassTable(("a", "b"), ((1, 2, 3), (4, 5, 6))), ignore=[(4, 5, 6)])
    assert parse_rgb(" 0, 10,255") == (0, 10, 255)
    for text in ("1,2", "1,2,256", "a,b,c", "1,2,3,4"):
        with pytest.raises(ValueError, match="R,G,B"):
            parse_rgb(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "labels", "--classes", "c.yaml", "--in", "x", "--out", "y", "--ignore-color", "300,0,0"])
    assert exit_info.value.code == 2
    assert (
        "argument --ignore-color: expected R,G,B with three values in 0..255, got '300,0,0'" in capsys.readouterr().err
    )
    src = tmp_path / "in"
    src.mkdir()
    table = ClassTable(("a", "b"), ((0, 0, 0), (255, 0, 0)))
    with pytest.raises(UserError, match="no .png label files in"):
        convert_label_folder(table, src, tmp_path / "out", progress=False)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(src / "grey.png")
    with pytest.raises(DataError, match=r"grey.png is a single-channel image \(mode L\), not a colour label"):
        convert_label_folder(table, src, tmp_path / "out", progress=False)
    (src / "grey.png").unlink()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba, mode="RGBA").save(src / "see_through.png")
    with pytest.raises(DataError, match=r"see_through.png has 1 pixel with alpha < 255; colour labels must be opaque"):
        convert_label_folder(table, src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_lookup_matches_a_dictionary_for_many_colours():
    rng = np.random.default_rng(7)
    codes = rng.choice(1 << 24, size=200, replace=False)
    colours = [((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255) for c in codes]
    table = ClassTable(tuple(f"c{i}" for i in range(200)), tuple(colours))
    lookup = colour_lookup(table)
    pick = rng.integers(0, 200, (30, 40))
    rgb = np.array(colours, np.uint8)[pick]
    assert np.array_equal(colours_to_index(rgb, lookup, "x"), pick.astype(np.uint8))
    assert encode_rgb(np.array([[[1, 2, 3]]], np.uint8))[0, 0] == (1 << 16) + (2 << 8) + 3


def test_check_data_suggests_the_converter_for_colour_labels(tmp_path, capsys):
    root = tmp_path / "ds"
    maps = _index_maps(2, with_ignore=False)
    _colour_folder(root / "labels", maps)
    (root / "images").mkdir()
    for name in maps:
        Image.fromarray(np.full((H, W, 3), 50, np.uint8)).save(root / "images" / f"{name}.png")
    _classes(root / "classes.yaml")
    problems = check_dataset("folder", root, progress=False)
    assert problems[0] == (
        f"label {root}/labels/frame_000.png is an RGB colour image, not a class-index map; convert colour labels "
        f"with 'dast convert labels --classes {root}/classes.yaml --in {root}/labels --out {root}/labels_index' "
        "and use labels_index as the label folder"
    )
    assert len(problems) == 2
    # following the suggestion gives a clean dataset
    assert _cli("--classes", f"{root}/classes.yaml", "--in", f"{root}/labels", "--out", f"{root}/labels_index") == 0
    capsys.readouterr()
    assert main(["check-data", "--dataset", "folder", "--root", str(root), "--labels", "labels_index", "--quiet"]) == 0
    assert "ok: no problems (2 images, 2 labels checked" in capsys.readouterr().out
    # reading a colour label while training points at the converter too
    with pytest.raises(DataError, match=r"got RGB: .*frame_000.png \(a colour label\? .*'dast convert labels'\)"):
        read_index_label(root / "labels" / "frame_000.png", 3)
