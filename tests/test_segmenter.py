"""`dast.Segmenter`: the Python predictor, its input types, its outputs and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dast import Prediction, Segmenter
from dast.errors import UserError
from dast.execution import Execution
from dast.inference.predict import predict_paths
from dast.models.io import ModelSpec, build_networks, load_networks, save_networks

INPUT_SIZE = (64, 32)  # (width, height)


def _checkpoint(path: Path, **spec_fields: object) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(arch="small", num_classes=4, norm="unit", input_size=INPUT_SIZE, **spec_fields)  # type: ignore[arg-type]
    save_networks(path, build_networks(spec))
    return path


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return _checkpoint(tmp_path / "model.safetensors")


def _rgb(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (no near-ties dominate the argmax)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _reference(ckpt: Path, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and attention computed here, independently of dast.inference: PIL bicubic, /255."""
    nets, _, _ = load_networks(ckpt, "cpu")
    small = Image.fromarray(rgb).resize(INPUT_SIZE, Image.BICUBIC)
    x = torch.from_numpy(np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0)[None]
    with torch.no_grad():
        logits, att = nets.target_model().eval()(x)
    return logits[0], att[0, 0]


def test_every_input_type_gives_the_labels_of_dast_predict(ckpt: Path, tmp_path: Path) -> None:
    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    a, b = _rgb(50, 30, 1).copy(), _rgb(50, 30, 2).copy()
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    nets, _, _ = load_networks(ckpt, "cpu")
    predict_paths(nets, [tmp_path / "a.png", tmp_path / "b.png"], tmp_path / "out", Execution(progress=False))
    from_files = [np.asarray(Image.open(tmp_path / "out" / f"{s}.png")) for s in "ab"]

    from_pil = seg(Image.fromarray(a))
    from_array = seg(a)
    from_path = seg(tmp_path / "a.png")
    from_chw = seg(torch.from_numpy(a).permute(2, 0, 1))
    batch = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2)  # N x 3 x H x W, uint8
    from_batch = seg(batch)
    from_float_batch = seg(batch.float())
    assert from_pil.shape == (30, 50) and from_pil.dtype == np.int64
    assert from_batch.shape == (2, 30, 50) and from_batch.dtype == np.int64
    for got in (from_pil, from_array, from_path, from_chw, from_batch[0], from_float_batch[0]):
        np.testing.assert_array_equal(got, from_files[0])
    np.testing.assert_array_equal(from_batch[1], from_files[1])
    np.testing.assert_array_equal(from_float_batch[1], from_files[1])

    # and the labels are the argmax of the bilinearly upsampled target-path logits
    logits, _ = _reference(ckpt, a)
    up = F.interpolate(logits[None], size=(30, 50), mode="bilinear", align_corners=True)
    np.testing.assert_array_equal(from_array, up.argmax(1)[0].numpy())


def test_probabilities_attention_and_logits(ckpt: Path) -> None:
    seg = Segmenter.from_checkpoint(ckpt)
    assert seg.has_attention and seg.num_classes == 4
    img = _rgb(50, 30, 3)
    p = seg.predict(img, probabilities=True, attention=True, logits=True)
    assert isinstance(p, Prediction)
    assert p.probabilities is not None and p.attention is not None and p.logits is not None
    assert p.probabilities.shape == (4, 30, 50) and p.probabilities.dtype == np.float32
    np.testing.assert_allclose(p.probabilities.sum(axis=0), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(p.probabilities.argmax(axis=0), p.labels)
    assert p.attention.shape == (30, 50) and p.attention.dtype == np.float32
    assert 0.0 <= float(p.attention.min()) and float(p.attention.max()) <= 1.0
    logits, att = _reference(ckpt, img)
    assert p.logits.shape == tuple(logits.shape) and p.logits.shape[0] == 4  # at the network's output size
    np.testing.assert_allclose(p.logits, logits.numpy(), rtol=0, atol=1e-6)
    want_att = F.interpolate(att[None, None], size=(30, 50), mode="bilinear", align_corners=True)[0, 0]
    np.testing.assert_allclose(p.attention, want_att.clamp(0, 1).numpy(), rtol=0, atol=1e-6)
    bare = seg.predict(img)
    assert bare.probabilities is None and bare.attention is None and bare.logits is None

    batch = seg.predict(torch.from_numpy(np.stack([img, img])).permute(0, 3, 1, 2), probabilities=True, attention=True)
    assert batch.labels.shape == (2, 30, 50)
    assert batch.probabilities is not None and batch.probabilities.shape == (2, 4, 30, 50)
    assert batch.attention is not None and batch.attention.shape == (2, 30, 50)


def test_a_model_without_discoverer_has_no_attention(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "plain.safetensors", discoverer=False, attention=False)
    seg = Segmenter.from_checkpoint(path)
    p = seg.predict(_rgb(40, 20, 4), attention=True, probabilities=True)
    assert not seg.has_attention and p.attention is None
    assert p.labels.shape == (20, 40) and p.probabilities is not None


def test_native_size_and_restored_train_mode(ckpt: Path) -> None:
    nets, _, _ = load_networks(ckpt, "cpu")
    for m in nets.modules():
        m.train()
    seg = Segmenter(nets)
    seg.input_size = None  # the image reaches the network at its own size
    p = seg.predict(_rgb(48, 24, 5), logits=True)
    assert p.logits is not None
    with torch.no_grad():
        native, resized = (seg.model(torch.zeros(1, 3, h, w))[0].shape[1:] for h, w in ((24, 48), (32, 64)))
    assert p.logits.shape == tuple(native) != tuple(resized)
    assert all(m.training for top in nets.modules() for m in top.modules())


@pytest.mark.parametrize(
    "bad,fragment",
    [
        (np.zeros((20, 30), np.uint8), "H x W x 3"),
        (np.zeros((20, 30, 4), np.uint8), "got shape (20, 30, 4)"),
        (np.zeros((20, 30, 3), np.float32), "uint8"),
        (np.zeros((0, 30, 3), np.uint8), "empty"),
        (torch.zeros(2, 20, 30, 3, dtype=torch.uint8), "N x 3 x H x W"),
        (torch.zeros(1, 3, 20, 30) - 1.5, "0..255"),
        (torch.full((1, 3, 20, 30), float("nan")), "NaN"),
        (torch.zeros(1, 3, 20, 30, dtype=torch.int32), "dtype torch.int32"),
        (torch.zeros(0, 3, 20, 30), "empty"),
        ([[0, 1], [2, 3]], "got list"),
        ("no/such/image.png", "image file not found"),
    ],
)
def test_bad_input_is_one_clear_error(ckpt: Path, bad: object, fragment: str) -> None:
    seg = Segmenter.from_checkpoint(ckpt)
    with pytest.raises(UserError) as info:
        seg(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)  # catchable as a ValueError too
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_missing_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.safetensors"):
        Segmenter.from_checkpoint(tmp_path / "nope.safetensors")
