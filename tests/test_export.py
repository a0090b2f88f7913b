"""`dast export --format onnx`: graph names, dynamic axes, parity with PyTorch at two sizes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dast.cli import main
from dast.errors import UserError
from dast.inference.export import export_onnx
from dast.models.io import ModelSpec, build_networks, load_networks, save_networks

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# onnxruntime and PyTorch use different convolution kernels; float32 sums of a few
# hundred terms agree to about 1e-6 here, so 1e-4 leaves room without hiding a wrong graph.
ATOL = 1e-4


def _checkpoint(tmp_path: Path, attention: bool = True) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(
        arch="small",
        num_classes=4,
        norm="unit",
        input_size=(64, 32),
        attention=attention,
        discoverer=attention,
        class_names=["a", "b", "c", "d"],
    )
    path = tmp_path / "model.safetensors"
    save_networks(path, build_networks(spec))
    return path


def _run_both(
    ckpt: Path, onnx_path: Path, shape: tuple[int, int, int, int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    nets, _, _ = load_networks(ckpt, "cpu")
    model = nets.target_model().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits", "attention"], {"image": x.numpy()})
    return ref, got


def test_export_matches_pytorch_at_two_sizes(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "attention"]
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3] and dims[1] == ""  # batch, height, width symbolic; 3 channels fixed
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["dast.norm"] == "unit" and json.loads(meta["dast.input_size"]) == [64, 32]
    assert not list(tmp_path.glob("*.tmp-*"))
    shapes = []
    for shape in [(1, 3, 32, 64), (2, 3, 45, 71)]:  # neither is the traced example size
        ref, got = _run_both(ckpt, out, shape)
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            np.testing.assert_allclose(g, r, rtol=0, atol=ATOL)
        assert ref[0].shape[1] == 4 and ref[1].shape[1] == 1
        assert float(ref[1].max()) > 0.0  # the attention branch is live, not the zero map
        shapes.append(ref[0].shape)
    assert shapes[0][2:] != shapes[1][2:]


def test_export_without_attention_gives_zero_map(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, attention=False)
    out = tmp_path / "plain.onnx"
    nets, _, _ = load_networks(ckpt, "cpu")
    export_onnx(nets, out, opset=13)
    ref, got = _run_both(ckpt, out, (1, 3, 40, 48))
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=ATOL)
    assert got[1].shape == ref[1].shape and not got[1].any()


def test_verify_flag_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--verify"]) == 0
    assert "max abs difference" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "y.onnx"), "--opset", "99"]) == 2
    assert "opset 99 is not supported" in capsys.readouterr().err
    assert (
        main(["export", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "z.onnx")]) == 2
    )
    assert not (tmp_path / "y.onnx").exists() and not (tmp_path / "z.onnx").exists()


def test_missing_onnx_is_a_clear_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nets, _, _ = load_networks(_checkpoint(tmp_path), "cpu")
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(
        UserError, match=r"pip install onnx onnxruntime \(or, from this checkout, pip install -e '\.\[export\]'\)"
    ):
        export_onnx(nets, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
