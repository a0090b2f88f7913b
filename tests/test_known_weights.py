"""Weight files recognised by their SHA-256 when ``dast convert`` reads them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from dast.cli import build_parser, main
from dast.commands.convert import run as convert_run
from dast.config import RuntimeConfig, load_config
from dast.models.convert import dast_to_official
from dast.models.io import ModelSpec, build_networks, load_networks
from dast.models.known_weights import (
    KNOWN_WEIGHTS,
    KnownWeights,
    file_sha256,
    identify,
    inspect_file,
    random_init_warning,
)
from dast.training.pipeline import close_logging, initial_networks, model_spec_for, setup_logging
from dast.training.runtime import make_runtime


def _entry(digest: str, full: bool, norm: str | None = None) -> KnownWeights:
    return KnownWeights(
        file_name=f"test-{digest[:8]}.pth",
        description="test weights",
        url="https://example.invalid/test.pth",
        sha256_prefix=digest[:8],
        sha256=digest if full else None,
        norm=norm,
    )


def test_streaming_hash_equals_the_one_shot_hash(tmp_path: Path) -> None:
    data = bytes(range(256)) * (10 * 1024 + 7)  # 2.6 MB: several 1 MiB chunks and a partial one
    (tmp_path / "w.bin").write_bytes(data)
    assert file_sha256(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty.bin").write_bytes(b"")
    assert file_sha256(tmp_path / "empty.bin") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_full_hash_and_prefix_rules() -> None:
    digest = hashlib.sha256(b"weights").hexdigest()
    other = hashlib.sha256(b"other").hexdigest()
    same_prefix = digest[:8] + other[8:]
    full, prefix = _entry(digest, True), _entry(digest, False)
    assert identify(digest, [full]) is full and identify(digest.upper(), [full]) is full
    assert identify(same_prefix, [full]) is None  # a published full hash must match in full
    assert identify(same_prefix, [prefix]) is prefix  # only the prefix is known: the prefix decides
    assert identify(other, [full, prefix]) is None
    assert identify(digest) is None  # not in the built-in table


def test_built_in_table_is_consistent() -> None:
    names = [k.file_name for k in KNOWN_WEIGHTS]
    assert len(set(names)) == len(names)
    assert {"DeepLab_resnet_pretrained_init-f81d91e8.pth", "vgg16-397923af.pth"} <= set(names)
    for k in KNOWN_WEIGHTS:
        assert re.fullmatch(r"[0-9a-f]{8}", k.sha256_prefix), k
        assert k.file_name.endswith(f"-{k.sha256_prefix}.pth") and k.url.endswith("/" + k.file_name), k
        if k.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", k.sha256) and k.sha256.startswith(k.sha256_prefix), k
        assert k.norm in ("caffe", "imagenet")


def _init_file(tmp_path: Path) -> Path:
    nets = build_networks(ModelSpec("small", 5, "paper"))
    sd = {
        "Scale." + k.replace("encoder.", "", 1).replace("tail.0.", "layer4.1.", 1): v
        for k, v in nets.segmentor.state_dict().items()
        if not k.startswith("classifier.")
    }
    assert len(nets.segmentor.encoder.layer4) == 1
    path = tmp_path / "init.pth"
    torch.save(sd, path)
    return path


def _imagenet_args(weights: Path, out: Path, *extra: str):
    return build_parser().parse_args(
        [
            "convert",
            "imagenet",
            "--weights",
            str(weights),
            "--arch",
            "small",
            "--num-classes",
            "5",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_convert_imagenet_names_a_known_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _init_file(tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "a.safetensors"
    assert convert_run(_imagenet_args(path, out), known=(_entry(digest, True, norm="caffe"),)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [
        f"sha256 of init.pth: {digest}",
        f"recognised: test weights (test-{digest[:8]}.pth), full SHA-256 matches",
    ]
    assert not any(line.startswith("note: test-") for line in printed)  # caffe is the deeplab default
    _, _, meta = load_networks(out)
    assert meta["converted"]["inputs"] == [
        {"file": "init.pth", "sha256": digest, "recognised": f"test-{digest[:8]}.pth"}
    ]
    # known only by its prefix, and trained with another normalisation than the one stored
    out2 = tmp_path / "b.safetensors"
    assert convert_run(_imagenet_args(path, out2), known=(_entry(digest, False, norm="imagenet"),)) == 0
    printed = capsys.readouterr().out
    assert (
        f"recognised: test weights (test-{digest[:8]}.pth), SHA-256 starts with {digest[:8]} as its file "
        "name says (no full hash is published)"
    ) in printed
    assert (
        f"note: test-{digest[:8]}.pth expects norm imagenet, but the checkpoint stores norm caffe; "
        "pass --norm imagenet unless you mean it"
    ) in printed


def test_convert_prints_the_hash_of_an_unknown_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _init_file(tmp_path)
    digest = file_sha256(path)
    assert inspect_file(path).known is None
    assert (
        main(
            [
                "convert",
                "imagenet",
                "--weights",
                str(path),
                "--arch",
                "small",
                "--num-classes",
                "5",
                "--out",
                str(tmp_path / "c.safetensors"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"sha256 of init.pth: {digest}\nnot a file dast knows (docs/weights.md lists them)" in printed
    assert "recognised:" not in printed
    # official: both files are hashed and recorded
    nets = build_networks(ModelSpec("small", 5, "reference"))
    seg, disc = dast_to_official(nets)
    torch.save(seg, tmp_path / "seg.pth")
    torch.save(disc, tmp_path / "d.pth")
    out = tmp_path / "o.safetensors"
    assert (
        main(
            [
                "convert",
                "official",
                "--segmentor",
                str(tmp_path / "seg.pth"),
                "--discriminators",
                str(tmp_path / "d.pth"),
                "--arch",
                "small",
                "--num-classes",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"sha256 of seg.pth: {file_sha256(tmp_path / 'seg.pth')}" in printed
    assert f"sha256 of d.pth: {file_sha256(tmp_path / 'd.pth')}" in printed
    _, _, meta = load_networks(out)
    assert [i["file"] for i in meta["converted"]["inputs"]] == ["seg.pth", "d.pth"]


def test_random_init_warning_text() -> None:
    r101 = random_init_warning("resnet101", None)
    assert r101 is not None and r101.startswith(
        "model.init is not set: the resnet101 backbone starts from random weights, not ImageNet"
    )
    assert (
        "'dast convert imagenet --weights DeepLab_resnet_pretrained_init-f81d91e8.pth --arch resnet101 "
        "--out weights/resnet101_init.safetensors'"
    ) in r101
    vgg = random_init_warning("vgg16", "")
    assert vgg is not None and "--weights vgg16-397923af.pth --arch vgg16" in vgg
    assert random_init_warning("small", None) is None  # the demo backbone starts from scratch by design
    assert random_init_warning("resnet101", "weights/resnet101_init.safetensors") is None


def test_training_without_init_warns_once_on_stderr_and_in_log(
    tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rt = make_runtime(RuntimeConfig(device="cpu"))
    cfg = load_config(tiny_config(model={"arch": "resnet101", "num_classes": 7, "norm": "caffe"}))
    log = setup_logging(run_dir, rt)
    try:
        initial_networks(cfg, model_spec_for(cfg), log)
        small = load_config(tiny_config("small.yaml"))
        initial_networks(small, model_spec_for(small), log)  # the demo backbone: no warning
    finally:
        close_logging(log)
    err = capsys.readouterr().err
    expected = random_init_warning("resnet101", None)
    assert err == f"WARNING: {expected}\n"
    logged = (run_dir / "log.txt").read_text()
    assert logged.count("WARNING model.init is not set") == 1 and logged.rstrip().endswith(str(expected))
