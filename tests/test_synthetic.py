"""The synthetic demo domains: determinism, labels, domain differences, shifts, folder output, CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from cityscapesscripts.helpers.labels import name2label
from PIL import Image

from dast.cli import main
from dast.config import DatasetConfig
from dast.data.datasets import build_dataset
from dast.data.synthetic import (
    DOMAINS,
    NUM_CLASSES,
    SHIFTS,
    SKY,
    SYNTHETIC_CLASSES,
    generate_scene,
    write_folder_dataset,
)

SIZE = (64, 32)


def test_classes_use_cityscapes_names_and_colours() -> None:
    assert len(SYNTHETIC_CLASSES) >= 6
    for name, colour in SYNTHETIC_CLASSES:
        assert tuple(name2label[name].color) == colour


@pytest.mark.parametrize("domain", DOMAINS)
def test_deterministic_and_index_dependent(domain: str) -> None:
    img, label = generate_scene(domain, 3, 7, SIZE)
    img2, label2 = generate_scene(domain, 3, 7, SIZE)
    assert img.shape == (32, 64, 3) and img.dtype == np.uint8
    assert label.shape == (32, 64) and label.dtype == np.uint8
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(label, label2)
    other, _ = generate_scene(domain, 4, 7, SIZE)
    reseeded, _ = generate_scene(domain, 3, 8, SIZE)
    assert not np.array_equal(img, other)
    assert not np.array_equal(img, reseeded)


def test_domains_differ_for_the_same_index() -> None:
    a, _ = generate_scene("source", 0, 0, SIZE)
    b, _ = generate_scene("target", 0, 0, SIZE)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("domain", DOMAINS)
def test_labels_in_range_and_every_class_appears(domain: str) -> None:
    seen = np.zeros(NUM_CLASSES, bool)
    for i in range(12):
        img, label = generate_scene(domain, i, 0, (128, 64))
        assert label.max() < NUM_CLASSES
        assert not (label[-1] == SKY).any()  # the ground fills the bottom row
        seen[np.unique(label)] = True
    assert seen.all(), [SYNTHETIC_CLASSES[i][0] for i in np.flatnonzero(~seen)]


@pytest.mark.parametrize("shift", SHIFTS)
def test_domains_differ_in_colour_statistics(shift: str) -> None:
    def stats(domain: str) -> tuple[np.ndarray, float, float]:
        scenes = [generate_scene(domain, i, 0, (96, 48), shift=shift) for i in range(8)]
        x = np.stack([img for img, _ in scenes]).astype(np.float64)
        labels = np.stack([label for _, label in scenes])
        saturation = (x.max(-1) - x.min(-1)).mean()
        # high-frequency energy: mean absolute difference of horizontal neighbours within
        # one region (object outlines are layout, not appearance)
        same = labels[:, :, 1:] == labels[:, :, :-1]
        detail = np.abs(np.diff(x, axis=2)).mean(-1)[same].mean()
        return x.reshape(-1, 3).mean(0), saturation, detail

    src_mean, src_sat, src_detail = stats("source")
    tgt_mean, tgt_sat, tgt_detail = stats("target")
    assert np.abs(src_mean - tgt_mean).max() > 5.0
    assert src_sat > 1.3 * tgt_sat  # the game is more saturated
    assert tgt_detail > 1.2 * src_detail  # the camera adds texture and noise


def test_source_regions_are_flat_target_regions_are_noisy() -> None:
    # the sky of the game is a smooth vertical gradient; the camera's has noise
    for domain, flat in (("source", True), ("target", False)):
        img, label = generate_scene(domain, 1, 0, (128, 64))
        rows = [r for r in range(64) if (label[r] == SKY).sum() >= 8]
        spread = max(float(np.ptp(img[r][label[r] == SKY].astype(int), axis=0).max()) for r in rows)
        assert (spread <= 2) == flat, (domain, spread)


def test_layout_statistics_differ_under_the_appearance_and_layout_shift() -> None:
    def road_top_row(domain: str) -> float:
        rows = []
        for i in range(10):
            _, label = generate_scene(domain, i, 0, (128, 64), shift="appearance+layout")
            rows.append(np.flatnonzero((label == 0).any(axis=1)).min())
        return float(np.mean(rows))

    assert road_top_row("target") < road_top_row("source")  # the target's horizon sits higher


# sha256(image bytes + label bytes)[:16] of scenes generated before the appearance shift
# existed; the appearance+layout shift must keep drawing exactly these scenes.
ORIGINAL_SCENES = {
    ("source", 0, 0, (128, 64)): "896100334bdd0ad5",
    ("source", 3, 7, (64, 32)): "abbd83629a87a258",
    ("source", 11, 2, (96, 48)): "40060abedc7d80fe",
    ("source", 5, 1, (160, 96)): "b17d517f1453b295",
    ("target", 0, 0, (128, 64)): "7fa1bbcb61b83336",
    ("target", 3, 7, (64, 32)): "50a3a784f4b4eca3",
    ("target", 11, 2, (96, 48)): "ee277d29d0925dbb",
    ("target", 5, 1, (160, 96)): "b13e65f11aa310b1",
}


@pytest.mark.parametrize("args", sorted(ORIGINAL_SCENES))
def test_appearance_and_layout_shift_draws_the_original_scenes(args: tuple) -> None:
    domain, index, seed, size = args
    img, label = generate_scene(domain, index, seed, size, shift="appearance+layout")
    assert hashlib.sha256(img.tobytes() + label.tobytes()).hexdigest()[:16] == ORIGINAL_SCENES[args]
    default, _ = generate_scene(domain, index, seed, size)
    assert not np.array_equal(default, img)  # the default is the appearance shift


@pytest.mark.parametrize("index,seed,size", [(0, 0, (128, 64)), (7, 3, (96, 48)), (42, 11, (64, 32))])
def test_appearance_shift_same_label_map_different_pixels(index: int, seed: int, size: tuple[int, int]) -> None:
    src_img, src_label = generate_scene("source", index, seed, size)
    tgt_img, tgt_label = generate_scene("target", index, seed, size, shift="appearance")
    np.testing.assert_array_equal(src_label, tgt_label)
    assert np.abs(src_img.astype(int) - tgt_img.astype(int)).mean() > 10.0
    # a different seed (the demo's source and target sets) is a different scene
    _, other = generate_scene("target", index, seed + 1, size)
    assert not np.array_equal(other, src_label)


def test_appearance_shift_pixel_shares_equal_and_every_class_present() -> None:
    counts = {d: np.zeros(NUM_CLASSES) for d in DOMAINS}
    for d in DOMAINS:
        for i in range(20):
            counts[d] += np.bincount(generate_scene(d, i, 0, (128, 64))[1].ravel(), minlength=NUM_CLASSES)
    np.testing.assert_array_equal(counts["source"], counts["target"])
    share = counts["source"] / counts["source"].sum()
    assert share.min() > 0.02, dict(zip([n for n, _ in SYNTHETIC_CLASSES], share.round(3)))


def test_rejects_an_unknown_shift() -> None:
    with pytest.raises(
        ValueError, match=r"unknown domain shift 'layout'; choose one of appearance, appearance\+layout, photographic$"
    ):
        generate_scene("source", 0, 0, SIZE, shift="layout")
    assert SHIFTS == ("appearance", "appearance+layout", "photographic")


def test_synthetic_dataset_passes_its_shift() -> None:
    for shift in SHIFTS:
        cfg = DatasetConfig(kind="synthetic", domain="target", count=2, size=(48, 32), shift=shift)
        ds = build_dataset(cfg, norm="unit", num_classes=NUM_CLASSES, seed=3)
        img, label = generate_scene("target", 1, 3, (48, 32), shift=shift)
        np.testing.assert_array_equal(ds.read_image_rgb(1), img)
        np.testing.assert_array_equal(ds.read_label_native(1), label)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="domain"):
        generate_scene("game", 0, 0, SIZE)
    with pytest.raises(ValueError, match="size"):
        generate_scene("source", 0, 0, (8, 8))


def test_write_folder_dataset(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "ds", "target", 3, 5, SIZE, progress=False)
    assert root == tmp_path / "ds"
    images = sorted(p.name for p in (root / "images").iterdir())
    labels = sorted(p.name for p in (root / "labels").iterdir())
    assert images == labels == ["target_00000.png", "target_00001.png", "target_00002.png"]
    img, label = generate_scene("target", 1, 5, SIZE)
    with Image.open(root / "images" / "target_00001.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), img)
    with Image.open(root / "labels" / "target_00001.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), label)
    classes = yaml.safe_load((root / "classes.yaml").read_text())
    assert classes == [{"name": n, "color": list(c)} for n, c in SYNTHETIC_CLASSES]
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_make_data_cli_both(tmp_path: Path) -> None:
    out = tmp_path / "data"
    code = main(["make-data", "--out", str(out), "--count", "2", "--size", "48", "32", "--seed", "1", "--no-progress"])
    assert code == 0
    for domain in DOMAINS:
        assert sorted(p.name for p in (out / domain / "labels").iterdir()) == [
            f"{domain}_00000.png",
            f"{domain}_00001.png",
        ]
        assert (out / domain / "classes.yaml").is_file()
        with Image.open(out / domain / "images" / f"{domain}_00001.png") as im:
            assert im.size == (48, 32)
            np.testing.assert_array_equal(np.asarray(im), generate_scene(domain, 1, 1, (48, 32))[0])


def test_make_data_cli_shift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "legacy"
    argv = ["make-data", "--out", str(out), "--count", "2", "--size", "48", "32", "--no-progress"]
    assert main([*argv, "--shift", "appearance+layout"]) == 0
    assert "appearance+layout shift" in capsys.readouterr().out
    for domain in DOMAINS:
        with Image.open(out / domain / "labels" / f"{domain}_00001.png") as im:
            np.testing.assert_array_equal(
                np.asarray(im), generate_scene(domain, 1, 0, (48, 32), "appearance+layout")[1]
            )
    shared = tmp_path / "shared"
    assert main(["make-data", "--out", str(shared), "--count", "2", "--size", "48", "32", "--no-progress"]) == 0
    for i in range(2):
        with (
            Image.open(shared / "source" / "labels" / f"source_0000{i}.png") as a,
            Image.open(shared / "target" / "labels" / f"target_0000{i}.png") as b,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the default: appearance only
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--shift", "layout"])
    assert exc.value.code == 2 and "invalid choice: 'layout'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown domain shift"):
        write_folder_dataset(tmp_path / "x", "source", 1, 0, (32, 32), progress=False, shift="both")
    assert not (tmp_path / "x").exists()


def test_make_data_cli_single_domain_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "src"
    assert main(["make-data", "--out", str(out), "--domain", "source", "--count", "1", "--size", "32", "32"]) == 0
    assert (out / "images" / "source_00000.png").is_file() and not (out / "target").exists()
    capsys.readouterr()
    assert main(["make-data", "--out", str(out), "--count", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --count must be at least 1, got 0"
    assert main(["make-data", "--out", str(out), "--size", "8", "64"]) == 2
    assert "--size" in capsys.readouterr().err
