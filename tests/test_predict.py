"""`dast predict` and the visualisation helpers: files, sizes, values, errors, batching."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dast.cli import main
from dast.errors import UserError
from dast.execution import Execution
from dast.inference.predict import expand_inputs, output_stem, predict_paths
from dast.inference.visualize import colorize, figure_grid, generated_palette, heatmap, overlay, palette_for
from dast.models.io import ModelSpec, build_networks, load_networks, save_networks

COLORS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
INPUT_SIZE = (64, 32)  # (width, height)


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(
        arch="small",
        num_classes=4,
        norm="unit",
        input_size=INPUT_SIZE,
        class_names=["road", "car", "sky", "tree"],
        class_colors=COLORS,
    )
    path = tmp_path / "model.safetensors"
    save_networks(path, build_networks(spec))
    return path


def _write_image(path: Path, w: int, h: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # smooth random images, so that the argmax is not dominated by near-ties
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": _write_image(tmp_path / "in" / "a.png", 50, 30, 1),
        "b": _write_image(tmp_path / "folder" / "b.png", 70, 41, 2),
        "c": _write_image(tmp_path / "folder" / "c.png", 70, 41, 3),
    }


def _predict(ckpt: Path, inputs: list[Path | str], out: Path, *extra: str) -> int:
    return main(
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--input",
            *map(str, inputs),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
            *extra,
        ]
    )


def _reference_logits(ckpt: Path, path: Path, size: tuple[int, int] = INPUT_SIZE) -> torch.Tensor:
    """Target-path logits computed here, independently of dast.inference: PIL bicubic, /255."""
    nets, _, _ = load_networks(ckpt, "cpu")
    model = nets.target_model().eval()
    rgb = Image.open(path).convert("RGB").resize(size, Image.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)[None]
    with torch.no_grad():
        logits, _ = model(x)
    return logits[0]


def test_predict_writes_every_output_at_the_original_size(ckpt: Path, images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _predict(ckpt, [images["a"], tmp_path / "folder"], out, "--save-logits") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"{s}{suffix}" for s in "abc" for suffix in (".png", "_color.png", "_overlay.png", "_attention.png", ".npy")
    )
    for stem, src in images.items():
        w, h = Image.open(src).size
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "L" and im.size == (w, h)
            label = np.asarray(im)
        for kind in ("color", "overlay", "attention"):
            with Image.open(out / f"{stem}_{kind}.png") as im:
                assert im.mode == "RGB" and im.size == (w, h)
        logits = np.load(out / f"{stem}.npy")
        assert logits.dtype == np.float32
        ref = _reference_logits(ckpt, src)
        assert logits.shape == tuple(ref.shape) and logits.shape[0] == 4
        np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-6)
        # trainIds: the bilinear (align_corners=True) upsampling of the logits, then the argmax
        up = F.interpolate(ref[None], size=(h, w), mode="bilinear", align_corners=True)
        np.testing.assert_array_equal(label, up.argmax(1)[0].numpy().astype(np.uint8))
        # the colour picture paints each trainId with its class colour
        color = np.asarray(Image.open(out / f"{stem}_color.png"))
        np.testing.assert_array_equal(color, np.asarray(COLORS, dtype=np.uint8)[label])
    assert not list(out.glob("*.tmp-*"))


def test_batched_equals_one_by_one(ckpt: Path, images: dict[str, Path], tmp_path: Path) -> None:
    inputs = [images["a"], images["b"], images["c"]]
    assert _predict(ckpt, inputs, tmp_path / "one", "--save-logits") == 0
    assert _predict(ckpt, inputs, tmp_path / "three", "--save-logits", "--batch-size", "3") == 0
    for stem in "abc":
        for suffix in (".png", "_color.png", "_attention.png"):
            assert np.array_equal(
                np.asarray(Image.open(tmp_path / "one" / f"{stem}{suffix}")),
                np.asarray(Image.open(tmp_path / "three" / f"{stem}{suffix}")),
            )
        np.testing.assert_allclose(
            np.load(tmp_path / "one" / f"{stem}.npy"), np.load(tmp_path / "three" / f"{stem}.npy"), rtol=0, atol=1e-5
        )


def test_native_size_groups_batches_by_image_size(ckpt: Path, images: dict[str, Path], tmp_path: Path) -> None:
    nets, _, _ = load_networks(ckpt, "cpu")
    nets.spec = dataclasses.replace(nets.spec, input_size=None)  # images reach the network at their own size
    inputs = [images["b"], images["a"], images["c"]]
    one = predict_paths(nets, inputs, tmp_path / "one", Execution(progress=False), save_logits=True)
    many = predict_paths(nets, inputs, tmp_path / "many", Execution(batch_size=3, progress=False), save_logits=True)
    assert [r["stem"] for r in one] == [r["stem"] for r in many] == ["b", "a", "c"]
    assert [(r["width"], r["height"]) for r in many] == [(70, 41), (50, 30), (70, 41)]
    for stem in "abc":
        a = np.load(tmp_path / "one" / f"{stem}.npy")
        np.testing.assert_allclose(a, np.load(tmp_path / "many" / f"{stem}.npy"), rtol=0, atol=1e-5)
        w, h = Image.open(images[stem]).size
        ref = _reference_logits(ckpt, images[stem], size=(w, h))
        np.testing.assert_allclose(a, ref.numpy(), rtol=0, atol=1e-6)


def test_predict_restores_train_mode(ckpt: Path, images: dict[str, Path], tmp_path: Path) -> None:
    nets, _, _ = load_networks(ckpt, "cpu")
    for m in nets.modules():
        m.train()
    predict_paths(nets, [images["a"]], tmp_path / "o", Execution(progress=False))
    assert all(m.training for top in nets.modules() for m in top.modules())


def test_size_override(ckpt: Path, images: dict[str, Path], tmp_path: Path) -> None:
    assert _predict(ckpt, [images["a"]], tmp_path / "o", "--save-logits", "--size", "32", "16") == 0
    ref = _reference_logits(ckpt, images["a"], size=(32, 16))
    logits = np.load(tmp_path / "o" / "a.npy")
    assert logits.shape == tuple(ref.shape)
    np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-6)
    assert Image.open(tmp_path / "o" / "a.png").size == (50, 30)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_exits_2_and_writes_nothing_for_it(
    ckpt: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    bad = tmp_path / "in" / "broken.png"
    if damage == "garbage":
        bad.write_bytes(b"this is not a png file at all")
    else:  # a valid header with the pixel data cut off: only decoding finds the problem
        data = images["b"].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    # one reader worker: the error raised in a worker process must still come out as one line
    code = main(
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--input",
            str(images["a"]),
            str(bad),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read image") and "broken.png" in err[0]
    written = [p.name for p in out.iterdir()] if out.exists() else []
    assert not [n for n in written if n.startswith("broken")]
    assert not [n for n in written if ".tmp-" in n]


def test_missing_checkpoint_exits_2(
    images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _predict(tmp_path / "nope.safetensors", [images["a"]], tmp_path / "out")
    assert code == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "nope.safetensors" in err


def test_name_clashes_are_refused(
    ckpt: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dup = _write_image(tmp_path / "other" / "a.jpg", 20, 20, 9)
    assert _predict(ckpt, [images["a"], dup], tmp_path / "out") == 2
    assert "'a'" in capsys.readouterr().err
    clash = _write_image(tmp_path / "other" / "a_color.png", 20, 20, 9)
    assert _predict(ckpt, [images["a"], clash], tmp_path / "out") == 2
    assert "a_color.png" in capsys.readouterr().err
    # predicting into the input folder would overwrite a.png with its own label map
    assert _predict(ckpt, [images["a"]], images["a"].parent) == 2
    assert "overwrite an input" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_expand_inputs(tmp_path: Path, images: dict[str, Path]) -> None:
    folder = tmp_path / "folder"
    (folder / "notes.txt").write_text("x")
    _write_image(folder / "sub" / "deep.png", 8, 8, 4)  # folders are not searched recursively
    _write_image(folder / "0.JPG", 8, 8, 5)
    got = expand_inputs([str(folder), str(images["b"])])  # b is also in the folder: kept once
    assert [p.name for p in got] == ["0.JPG", "b.png", "c.png"]
    assert [p.name for p in expand_inputs([str(folder / "*.png")])] == ["b.png", "c.png"]
    with pytest.raises(UserError, match="no images"):
        expand_inputs([str(tmp_path / "empty*.png")])
    with pytest.raises(UserError, match="input not found"):
        expand_inputs([str(tmp_path / "missing.png")])
    assert output_stem(Path("x/aachen_000000_000019_leftImg8bit.png")) == "aachen_000000_000019"


def test_colorize_ignore_and_unknown_ids_are_black() -> None:
    label = np.array([[0, 1, 255], [3, 7, 2]], dtype=np.uint8)
    got = colorize(label, COLORS)
    want = np.array([[COLORS[0], COLORS[1], (0, 0, 0)], [COLORS[3], (0, 0, 0), COLORS[2]]], dtype=np.uint8)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 3)


def test_overlay_and_heatmap_values() -> None:
    img = np.full((2, 2, 3), 100, np.uint8)
    col = np.full((2, 2, 3), 201, np.uint8)
    assert overlay(img, col).tolist() == np.full((2, 2, 3), 150, np.uint8).tolist()  # 0.5 * 100 + 0.5 * 201 = 150.5
    assert overlay(img, col, alpha=1.0).tolist() == col.tolist()
    hm = heatmap(np.array([[0.0, 1.0], [2.0, np.nan]]))
    assert hm.dtype == np.uint8 and hm.shape == (2, 2, 3)
    assert hm[0, 0].tolist() == [0, 0, 3]  # inferno at 0
    assert hm[0, 1].tolist() == hm[1, 0].tolist() != hm[0, 0].tolist()  # values above 1 are clipped
    assert hm[1, 1].tolist() == hm[0, 0].tolist()  # NaN drawn as 0


def test_palettes() -> None:
    city = palette_for(19)
    assert city[0] == (128, 64, 128) and city[18] == (119, 11, 32)  # road, bicycle
    for n in (5, 20, 30):
        pal = generated_palette(n)
        assert len(pal) == n == len(set(pal)) and (0, 0, 0) not in pal
    assert generated_palette(7) == generated_palette(7)
    assert palette_for(4, COLORS) == COLORS
    with pytest.raises(ValueError):
        palette_for(5, COLORS)


def test_figure_grid(tmp_path: Path) -> None:
    img = np.zeros((20, 40, 3), np.uint8)
    lab = np.ones((20, 40), np.uint8)
    path = tmp_path / "fig.png"
    figure_grid([[img, lab, img], [img, lab, img]], ["image", "label", "attention"], path, row_labels=["1", "2"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 0
    with pytest.raises(ValueError, match="column titles"):
        figure_grid([[img, lab]], ["image", "label", "attention"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
