"""Confusion matrix, IoU tables, the evaluation protocol and agreement with cityscapesscripts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev
from PIL import Image
from torch import nn

from dast.cli import main
from dast.config import DatasetConfig
from dast.data.datasets import build_dataset
from dast.data.labels import SYNTHIA_13, SYNTHIA_16, cityscapes_table, train_to_cityscapes_id
from dast.errors import DataError
from dast.evaluation.confusion import ConfusionMatrix
from dast.evaluation.evaluate import evaluate_model, evaluate_predictions
from dast.evaluation.metrics import compute_metrics, format_table, iou_per_class
from dast.execution import Execution
from dast.models import TargetModel, build_discoverer, build_segmentor
from dast.models.io import ModelSpec, build_networks, save_networks

NAMES = ("frankfurt_000000_000294", "frankfurt_000001_007973", "lindau_000000_000019")


def make_cityscapes(root: Path, w: int, h: int, seed: int = 0, split: str = "val") -> None:
    rng = np.random.default_rng(seed)
    for name in NAMES:
        city = name.split("_")[0]
        img = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
        lab = root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img)
        ids = rng.integers(0, 34, (h, w)).astype(np.uint8)
        ids[ids == 31] = 26  # no 'train' ground truth anywhere
        Image.fromarray(ids).save(lab)


def random_predictions(pred_dir: Path, w: int, h: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    pred_dir.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        pred = rng.integers(0, 19, (h, w)).astype(np.uint8)
        pred[pred == 16] = 0  # 'train' is never predicted either -> its IoU is undefined
        pred[pred == 15] = 3  # 'bus' never predicted -> IoU 0
        Image.fromarray(pred).save(pred_dir / f"{name}.png")


def test_confusion_matrix_counts_by_hand():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1], [2, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [0, 2, 2]])
    cm.update(pred, target)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 0]]
    other = ConfusionMatrix(3)
    other.update(np.array([2]), np.array([2]))
    cm.merge(other).all_reduce()  # all_reduce is a no-op without torch.distributed
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    with pytest.raises(ValueError):
        cm.update(torch.tensor([3]), torch.tensor([0]))


def test_iou_and_metrics_by_hand():
    m = np.array([[3, 1, 0], [1, 1, 0], [0, 0, 0]])
    iou = iou_per_class(m)
    assert iou[0] == pytest.approx(3 / 5) and iou[1] == pytest.approx(1 / 3) and math.isnan(iou[2])
    out = compute_metrics(m, ["a", "b", "c"], num_images=2)
    assert out["miou"] == pytest.approx(100 * (3 / 5 + 1 / 3) / 2)
    assert out["per_class"] == {"a": pytest.approx(60.0), "b": pytest.approx(100 / 3), "c": None}
    assert out["num_images"] == 2 and set(out) == {"miou", "per_class", "num_images"}


def test_synthia_13_class_miou_is_not_a_rescaled_19_class_miou():
    # class c gets IoU (c + 1) / 20; wall/fence/pole are dropped by the 13-class protocol
    m = np.zeros((19, 19), np.int64)
    for c in range(19):
        m[c, c] = c + 1
        m[c, (c + 1) % 19] = 19 - c
    iou = iou_per_class(m)
    out = compute_metrics(m, cityscapes_table().names, {"miou_16": SYNTHIA_16, "miou_13": SYNTHIA_13})
    assert out["miou_16"] == pytest.approx(100 * np.mean(iou[list(SYNTHIA_16)]))
    assert out["miou_13"] == pytest.approx(100 * np.mean(iou[list(SYNTHIA_13)]))
    assert out["miou_13"] != pytest.approx(out["miou_16"] * 16 / 13)
    assert out["miou_13"] != pytest.approx(out["miou"] * 19 / 13)
    table = format_table(out)
    head = table.splitlines()[0]
    assert head.index("road") < head.index("bicycle") < head.index("mIoU-16") < head.index("mIoU*-13")


def test_predictions_agree_with_the_cityscapes_evaluator(tmp_path, monkeypatch):
    w, h = 64, 32
    root, preds, out = tmp_path / "cs", tmp_path / "pred", tmp_path / "out"
    make_cityscapes(root, w, h)
    random_predictions(preds, w, h)
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "cityscapes",
                "--root",
                str(root),
                "--predictions",
                str(preds),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    ours = json.loads((out / "metrics.json").read_text())
    assert ours["num_images"] == 3 and "miou_16" not in ours

    # the official evaluator on label-id versions of the same predictions
    lut = train_to_cityscapes_id()
    official = tmp_path / "official"
    official.mkdir()
    pred_list, gt_list = [], []
    for name in NAMES:
        city = name.split("_")[0]
        p = official / f"{name}.png"
        Image.fromarray(lut[np.asarray(Image.open(preds / f"{name}.png"))]).save(p)
        pred_list.append(str(p))
        gt_list.append(str(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png"))
    for key, value in {
        "evalInstLevelScore": False,
        "quiet": True,
        "JSONOutput": False,
        "colorized": False,
        "exportFile": str(tmp_path / "cs_result.json"),
        "evalPixelAccuracy": False,
    }.items():
        monkeypatch.setattr(ev.args, key, value)
    theirs = ev.evaluateImgLists(pred_list, gt_list, ev.args)
    assert not (tmp_path / "cs_result.json").exists()
    for name in cityscapes_table().names:
        ref = theirs["classScores"][name]
        if math.isnan(ref):
            assert ours["per_class"][name] is None, name
        else:
            assert ours["per_class"][name] / 100 == pytest.approx(ref, abs=1e-6), name
    assert ours["per_class"]["train"] is None and ours["per_class"]["bus"] == 0.0
    assert ours["miou"] / 100 == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)


class _Tiny(nn.Module):
    """Logits at 1/4 resolution from a fixed linear map of pooled pixels; returns (logits, attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.conv = nn.Conv2d(3, 19, 1)
        torch.manual_seed(0)
        nn.init.normal_(self.conv.weight, std=2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.conv(self.pool(x))
        return logits, torch.zeros_like(logits[:, :1])


def test_model_protocol_upsamples_logits_to_native_labels(tmp_path):
    w, h = 32, 16
    make_cityscapes(tmp_path, w, h)
    cfg = DatasetConfig(kind="cityscapes", root=str(tmp_path), split="val", size=(16, 8))
    ds = build_dataset(cfg, norm="unit", num_classes=19)
    model = _Tiny().train()
    metrics = evaluate_model(model, ds, Execution(progress=False))
    assert model.training  # the caller's mode is restored
    # the same protocol by hand: resized input, align_corners upsampling to 32x16, argmax
    manual = np.zeros((19, 19), np.int64)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    with torch.no_grad():
        for i, name in enumerate(ds.names):
            logits = model(ds.prepare_image(i)[None])[0]
            assert logits.shape[-2:] == (2, 4)
            pred = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True).argmax(1)[0].numpy()
            gt = ds.read_label_native(i)
            valid = gt != 255
            np.add.at(manual, (gt[valid], pred[valid]), 1)
            Image.fromarray(pred.astype(np.uint8)).save(pred_dir / f"{name}.png")
    expected = compute_metrics(manual, ds.table.names, {}, 3)
    assert metrics["miou"] == pytest.approx(expected["miou"]) and metrics["num_images"] == 3
    assert metrics["per_class"] == expected["per_class"]
    assert evaluate_predictions(ds, pred_dir, progress=False)["per_class"] == expected["per_class"]
    batched = evaluate_model(model, ds, Execution(batch_size=2, progress=False))
    assert batched["per_class"] == expected["per_class"]
    shard = evaluate_model(model, ds, Execution(indices=[0, 2], progress=False))
    assert shard["num_images"] == 2


def test_prediction_errors(tmp_path):
    make_cityscapes(tmp_path / "cs", 16, 8)
    ds = build_dataset(
        DatasetConfig(kind="cityscapes", root=str(tmp_path / "cs"), split="val"), norm="unit", num_classes=19
    )
    preds = tmp_path / "pred"
    random_predictions(preds, 16, 8)
    (preds / f"{NAMES[1]}.png").unlink()
    with pytest.raises(DataError, match=f"prediction missing: .*{NAMES[1]}.png"):
        evaluate_predictions(ds, preds, progress=False)
    Image.fromarray(np.zeros((4, 8), np.uint8)).save(preds / f"{NAMES[1]}.png")
    with pytest.raises(DataError, match=f"prediction .*{NAMES[1]}.png is 8x4 but the label of {NAMES[1]} is 16x8"):
        evaluate_predictions(ds, preds, progress=False)


def test_synthia_dataset_reports_both_protocols(tmp_path):
    root = tmp_path / "syn"
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    ids = np.random.default_rng(0).integers(0, 23, (8, 12)).astype(np.uint16)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(root / "RGB" / "0000000.png")
    cv2.imwrite(str(root / "GT" / "LABELS" / "0000000.png"), np.stack([ids * 0, ids * 0, ids], -1))
    Image.fromarray(np.full((8, 12), 2, np.uint8)).save(tmp_path / "0000000.png")
    ds = build_dataset(DatasetConfig(kind="synthia", root=str(root)), norm="unit", num_classes=19)
    out = evaluate_predictions(ds, tmp_path, progress=False)
    assert set(out) == {"miou", "per_class", "miou_16", "miou_13", "num_images"}
    # everything is predicted 'building' (2): only building has a non-zero IoU
    building = out["per_class"]["building"]
    assert 0 < building < 100
    defined = [c for c in range(19) if out["per_class"][cityscapes_table().names[c]] is not None]
    assert out["miou_13"] == pytest.approx(building / len([c for c in SYNTHIA_13 if c in defined]))


def test_evaluate_command_with_a_checkpoint(tmp_path):
    make_cityscapes(tmp_path / "cs", 32, 16)
    torch.manual_seed(0)
    spec = ModelSpec(
        arch="small",
        num_classes=19,
        norm="unit",
        input_size=(16, 8),
        discoverer=False,
        attention=False,
        corrector=False,
    )
    nets = build_networks(spec)
    save_networks(tmp_path / "m.safetensors", nets)
    rc = main(
        [
            "evaluate",
            "--dataset",
            "cityscapes",
            "--root",
            str(tmp_path / "cs"),
            "--checkpoint",
            str(tmp_path / "m.safetensors"),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--quiet",
            "--workers",
            "0",
        ]
    )
    assert rc == 0
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())
    ds = build_dataset(
        DatasetConfig(kind="cityscapes", root=str(tmp_path / "cs"), split="val", size=(16, 8)),
        norm="unit",
        num_classes=19,
    )
    direct = evaluate_model(nets.target_model(), ds, Execution(progress=False))
    assert got["num_images"] == 3 and got["per_class"] == pytest.approx(direct["per_class"], nan_ok=True)
    assert got["miou"] == pytest.approx(direct["miou"])


def test_evaluate_command_user_errors(tmp_path, capsys):
    rc = main(
        [
            "evaluate",
            "--dataset",
            "cityscapes",
            "--root",
            str(tmp_path / "missing"),
            "--predictions",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "error: dataset root not found" in capsys.readouterr().err
    make_cityscapes(tmp_path / "cs", 16, 8)
    rc = main(
        [
            "evaluate",
            "--dataset",
            "cityscapes",
            "--root",
            str(tmp_path / "cs"),
            "--predictions",
            str(tmp_path / "cs"),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 2 and "error: prediction missing" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_evaluation_gives_every_submodule_its_own_mode_back() -> None:
    # a self-training round with frozen BatchNorm trains in eval mode; evaluating through a
    # fresh TargetModel wrapper (in train mode) must not switch the segmentor back to train mode
    torch.manual_seed(0)
    seg = build_segmentor("small", 7, "paper")
    model = TargetModel(seg, build_discoverer(seg.feature_channels))
    seg.eval()
    assert model.training and not seg.training
    cfg = DatasetConfig(kind="synthetic", domain="target", count=2, size=(64, 32))
    val = build_dataset(cfg, norm="unit", num_classes=7, with_labels=True, seed=0)
    evaluate_model(model, val, Execution(progress=False))
    assert model.training and not any(m.training for m in seg.modules())
    assert model.discoverer is not None and model.discoverer.training
