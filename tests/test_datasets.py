"""Datasets on tiny fixtures in each dataset's exact on-disk layout and encoding."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dast.config import AugmentConfig, ClassSpec, DatasetConfig
from dast.data.datasets import build_dataset, entry_to_name, save_label_png, with_label_dir
from dast.data.labels import cityscapes_id_to_train_lut, cityscapes_table
from dast.data.readers import read_cityscapes_label, read_gta5_label, read_image, read_synthia_label
from dast.data.synthetic import generate_scene
from dast.errors import ConfigError, DataError

W, H = 12, 8


def _rgb(seed: int, w: int = W, h: int = H) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_rgb(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _save_palette(path: Path, ids: np.ndarray) -> None:
    """An 8-bit palette PNG (mode 'P'), as GTA5 ships its labels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8))
    img.putpalette(cityscapes_table().palette())
    assert img.mode == "P"
    img.save(path)


def _ids_for(rgb: np.ndarray, choices: list[int]) -> np.ndarray:
    """A label whose id at each pixel is determined by the image's red channel."""
    return np.asarray(choices, np.uint8)[rgb[:, :, 0] % len(choices)]


def make_gta5(root: Path, n: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for k in range(1, n + 1):
        rgb = _rgb(k)
        ids = _ids_for(rgb, [7, 26, 0, 11, 24])
        _save_rgb(root / "images" / f"{k:05d}.png", rgb)
        _save_palette(root / "labels" / f"{k:05d}.png", ids)
        out[f"{k:05d}"] = (rgb, ids)
    return out


def make_synthia(root: Path, n: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for k in range(n):
        rgb = _rgb(100 + k)
        ids = _ids_for(rgb, [3, 21, 13, 8, 0, 1]).astype(np.uint16)
        bgr = np.zeros((H, W, 3), np.uint16)
        bgr[:, :, 0] = 1000 + k  # instance-like junk in the first channels
        bgr[:, :, 1] = 4
        bgr[:, :, 2] = ids  # the class id sits in the channel cv2 returns last
        name = f"{k:07d}"
        _save_rgb(root / "RGB" / f"{name}.png", rgb)
        (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / "GT" / "LABELS" / f"{name}.png"), bgr)
        out[name] = (rgb, ids)
    return out


def make_cityscapes(
    root: Path,
    split: str = "val",
    w: int = W,
    h: int = H,
    names: tuple[str, ...] = ("frankfurt_000000_000294", "aachen_000001_000019", "aachen_000000_000019"),
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    rng = np.random.default_rng(seed)
    for k, name in enumerate(names):
        city = name.split("_")[0]
        rgb = _rgb(200 + k + seed, w, h)
        ids = rng.integers(0, 34, (h, w)).astype(np.uint8)
        ids[ids == 31] = 7  # no 'train' pixels anywhere
        _save_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", rgb)
        lab = root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"
        lab.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(lab)
        out[name] = (rgb, ids)
    return out


def _unit(img: torch.Tensor) -> np.ndarray:
    return np.rint(img.numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8)


def test_gta5_palette_labels_are_aligned_and_mapped(tmp_path):
    data = make_gta5(tmp_path)
    ds = build_dataset(DatasetConfig(kind="gta5", root=str(tmp_path)), norm="unit", num_classes=19)
    assert ds.names == ["00001", "00002", "00003"] and ds.has_labels and ds.kind == "gta5"
    for i, name in enumerate(ds.names):
        rgb, ids = data[name]
        item = ds[i]
        assert item["name"] == name and item["index"] == i
        assert np.array_equal(_unit(item["image"]), rgb)
        lab = item["label"].numpy()
        assert item["label"].dtype == torch.int64
        expected = np.select([ids == 7, ids == 26, ids == 11, ids == 24], [0, 13, 2, 11], 255)
        assert np.array_equal(lab, expected)
    assert read_gta5_label(tmp_path / "labels" / "00001.png").dtype == np.uint8


def test_synthia_uses_the_last_cv2_channel(tmp_path):
    data = make_synthia(tmp_path)
    ds = build_dataset(DatasetConfig(kind="synthia", root=str(tmp_path)), norm="unit", num_classes=19)
    assert ds.names == ["0000000", "0000001"]
    for i, name in enumerate(ds.names):
        rgb, ids = data[name]
        lab = ds[i]["label"].numpy()
        assert np.array_equal(_unit(ds[i]["image"]), rgb)
        expected = np.select([ids == 3, ids == 21, ids == 8, ids == 1], [0, 3, 13, 10], 255)
        assert np.array_equal(lab, expected)
    # a single-channel file is the wrong encoding
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match="multi-channel SYNTHIA label.*bad.png"):
        read_synthia_label(tmp_path / "bad.png")


def test_cityscapes_names_order_and_labels(tmp_path):
    data = make_cityscapes(tmp_path)
    ds = build_dataset(
        DatasetConfig(kind="cityscapes", root=str(tmp_path), split="val", size=(6, 4)), norm="unit", num_classes=19
    )
    assert ds.names == ["aachen_000000_000019", "aachen_000001_000019", "frankfurt_000000_000294"]

    lut = cityscapes_id_to_train_lut()
    for i, name in enumerate(ds.names):
        rgb, ids = data[name]
        item = ds[i]
        assert item["image"].shape == (3, 4, 6) and item["label"].shape == (4, 6)
        native = ds.read_label_native(i)
        assert native.shape == (H, W) and np.array_equal(native, lut[ids])
        assert ds.read_image_rgb(i).shape == (4, 6, 3)
        # nearest-neighbour resize of the native label
        small = np.asarray(Image.fromarray(lut[ids]).resize((6, 4), Image.NEAREST))
        assert np.array_equal(item["label"].numpy(), small)


def test_list_file_forms_restrict_and_order(tmp_path):
    make_cityscapes(tmp_path)
    lst = tmp_path / "val.txt"
    lst.write_text(
        "frankfurt/frankfurt_000000_000294_leftImg8bit.png\n\n# comment\naachen_000000_000019\n"
        "leftImg8bit/val/aachen/aachen_000001_000019_leftImg8bit.png extra-field\n"
    )
    ds = build_dataset(
        DatasetConfig(kind="cityscapes", root=str(tmp_path), split="val", list_file=str(lst)),
        norm="unit",
        num_classes=19,
    )
    assert ds.names == ["frankfurt_000000_000294", "aachen_000000_000019", "aachen_000001_000019"]
    lst.write_text("aachen_000000_000019\nbremen_000000_000019_leftImg8bit.png\n")
    with pytest.raises(DataError, match=r"val.txt:2: 'bremen_000000_000019_leftImg8bit.png'"):
        build_dataset(
            DatasetConfig(kind="cityscapes", root=str(tmp_path), split="val", list_file=str(lst)),
            norm="unit",
            num_classes=19,
        )
    assert entry_to_name("00001.png") == "00001" and entry_to_name("images/00001.png") == "00001"
    assert entry_to_name("a/b_gtFine_labelIds.png") == "b" and entry_to_name("x.v2") == "x.v2"


def test_missing_root_folder_and_label_errors(tmp_path):
    with pytest.raises(DataError, match="dataset root not found: .*nowhere"):
        build_dataset(DatasetConfig(kind="gta5", root=str(tmp_path / "nowhere")), norm="unit", num_classes=19)
    with pytest.raises(ConfigError, match="needs 'root'"):
        build_dataset(DatasetConfig(kind="gta5"), norm="unit", num_classes=19)
    with pytest.raises(DataError, match="image folder not found: .*images"):
        build_dataset(DatasetConfig(kind="gta5", root=str(tmp_path)), norm="unit", num_classes=19)
    make_gta5(tmp_path)
    (tmp_path / "labels" / "00002.png").unlink()
    with pytest.raises(DataError, match=r"image .*00002.png has no label file .*labels/00002.png"):
        build_dataset(DatasetConfig(kind="gta5", root=str(tmp_path)), norm="unit", num_classes=19)
    ds = build_dataset(DatasetConfig(kind="gta5", root=str(tmp_path), with_labels=False), norm="unit", num_classes=19)
    assert not ds.has_labels and "label" not in ds[1] and len(ds) == 3


def test_rgb_label_and_bad_values_are_data_errors(tmp_path):
    _save_rgb(tmp_path / "rgb_label.png", _rgb(1))
    with pytest.raises(DataError, match="expected a single-channel label image, got RGB: .*rgb_label.png"):
        read_cityscapes_label(tmp_path / "rgb_label.png")
    _save_palette(tmp_path / "bad.png", np.full((H, W), 40, np.uint8))
    with pytest.raises(DataError, match=r"label .*bad.png has value\(s\) 40 outside 0..33"):
        read_gta5_label(tmp_path / "bad.png")


def test_corrupt_image_fails_or_is_skipped(tmp_path, caplog):
    make_gta5(tmp_path)
    good = (tmp_path / "images" / "00001.png").read_bytes()
    (tmp_path / "images" / "00001.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cannot read image .*00001.png"):
        read_image(tmp_path / "images" / "00001.png")
    ds = build_dataset(DatasetConfig(kind="gta5", root=str(tmp_path)), norm="unit", num_classes=19)
    with pytest.raises(DataError, match="00001.png"):
        ds[0]
    ds = build_dataset(DatasetConfig(kind="gta5", root=str(tmp_path), on_corrupt="skip"), norm="unit", num_classes=19)
    with caplog.at_level(logging.WARNING):
        item = ds[3]  # 3 % 3 == 0 -> the corrupt sample -> the next one
    assert item["name"] == "00002" and item["index"] == 1
    assert "00001.png" in caplog.text


def test_index_wraps_and_augmentation_is_deterministic_and_aligned(tmp_path):
    root = tmp_path / "f"
    for k in range(2):
        rgb = _rgb(k, 16, 10)
        rgb[:, :, 1] = np.random.default_rng(k).integers(0, 3, (10, 16)) * 60
        _save_rgb(root / "images" / f"im{k}.png", rgb)
        (root / "labels").mkdir(exist_ok=True)
        Image.fromarray((rgb[:, :, 1] // 60).astype(np.uint8)).save(root / "labels" / f"im{k}.png")
    classes = [ClassSpec(name=n) for n in ("a", "b", "c")]
    cfg = DatasetConfig(kind="folder", root=str(root), classes=classes, augment=AugmentConfig(flip=True, crop=(12, 12)))
    ds = build_dataset(cfg, norm="unit", num_classes=3, seed=5)
    again = build_dataset(cfg, norm="unit", num_classes=3, seed=5)
    variants = set()
    for i in range(12):
        a, b = ds[i], again[i]
        assert a["index"] == i % 2 and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        img, lab = _unit(a["image"]), a["label"].numpy()
        assert img.shape == (12, 12, 3)
        inside = lab != 255
        assert (~inside).sum() == 12 * 2  # two padded rows (height 10 -> 12)
        assert np.array_equal(img[:, :, 1][inside], lab[inside] * 60)
        variants.add(a["image"].sum().item())
    assert len(variants) > 2  # different epochs (indices) get different crops/flips
    other = build_dataset(cfg, norm="unit", num_classes=3, seed=6)
    assert any(not torch.equal(ds[i]["image"], other[i]["image"]) for i in range(6))
    with pytest.raises(IndexError):
        ds[-1]


def test_scale_augmentation_keeps_image_and_label_sizes_equal(tmp_path):
    make_gta5(tmp_path)
    cfg = DatasetConfig(kind="gta5", root=str(tmp_path), augment=AugmentConfig(scale=(0.5, 2.0)))
    ds = build_dataset(cfg, norm="caffe", num_classes=19, seed=1)
    sizes = set()
    for i in range(6):
        item = ds[i]
        assert item["image"].shape[1:] == item["label"].shape
        sizes.add(tuple(item["label"].shape))
    assert len(sizes) > 1


def test_folder_dataset_with_classes_yaml_and_pseudo_labels(tmp_path):
    root = tmp_path / "aerial"
    _save_rgb(root / "images" / "b.jpg", _rgb(1))
    _save_rgb(root / "images" / "a.png", _rgb(2))
    (root / "classes.yaml").write_text("- {name: water, color: [0, 0, 255]}\n- {name: land, color: [0, 255, 0]}\n")
    (root / "labels").mkdir()
    lab = np.zeros((H, W), np.uint8)
    lab[0] = 255
    lab[1] = 1
    Image.fromarray(lab).save(root / "labels" / "a.png")
    Image.fromarray(np.full((H, W), 2, np.uint8)).save(root / "labels" / "b.png")
    cfg = DatasetConfig(kind="folder", root=str(root))
    ds = build_dataset(cfg, norm="imagenet", num_classes=2)
    assert ds.names == ["a", "b"] and ds.table.names == ("water", "land")
    assert np.array_equal(ds[0]["label"].numpy(), lab)
    with pytest.raises(DataError, match=r"b.png has value\(s\) 2 outside 0..1 or 255"):
        ds[1]
    # pseudo labels for a target dataset used without its own labels
    target = build_dataset(cfg, norm="imagenet", num_classes=2, with_labels=False)
    pl = tmp_path / "pl"
    save_label_png(pl / "a.png", np.ones((H, W), np.uint8), ds.table)
    with pytest.raises(DataError, match="pseudo label missing: .*b.png"):
        with_label_dir(target, pl)
    save_label_png(pl / "b.png", np.zeros((H, W), np.uint8))
    paired = with_label_dir(target, pl)
    assert paired.has_labels and paired.names == target.names
    assert torch.equal(paired[0]["image"], target[0]["image"])
    assert paired[0]["label"].unique().tolist() == [1] and paired[1]["label"].unique().tolist() == [0]
    assert Image.open(pl / "a.png").mode == "P"


def test_synthetic_dataset_matches_the_generator(tmp_path):
    cfg = DatasetConfig(kind="synthetic", domain="target", count=3, size=(32, 24))
    ds = build_dataset(cfg, norm="unit", num_classes=7, seed=4)
    assert len(ds) == 3 and ds.names[0] == "target_00000"
    rgb, lab = generate_scene("target", 2, 4, (32, 24))
    item = ds[5]
    assert item["index"] == 2
    assert np.array_equal(_unit(item["image"]), rgb) and np.array_equal(item["label"].numpy(), lab)
    with pytest.raises(ConfigError, match="needs 'size'"):
        build_dataset(DatasetConfig(kind="synthetic"), norm="unit", num_classes=7)
