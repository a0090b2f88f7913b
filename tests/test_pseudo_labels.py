"""Pseudo labels: streaming thresholds against the released sorted list, selection, files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dast.cli import main
from dast.config import DatasetConfig, SelfTrainingConfig, load_config
from dast.data import datasets
from dast.data.datasets import build_dataset
from dast.errors import UserError
from dast.execution import Execution
from dast.models import build_discoverer, build_segmentor
from dast.models.io import ModelSpec, build_networks, save_networks
from dast.models.target_model import TargetModel
from dast.training.pseudo_labels import (
    CITYSCAPES_COLORS,
    COMPLETE_NAME,
    MARKER_NAME,
    ThresholdEstimator,
    generate_pseudo_labels,
    pseudo_label_precision,
    pseudo_label_set_complete,
    select_labels,
    sorted_list_confidences,
    sorted_list_thresholds,
    target_probabilities,
)

NUM_CLASSES = 6


def _bits(a: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = a.cpu().numpy() if isinstance(a, torch.Tensor) else a
    return np.asarray(arr, np.float32).view(np.int32)


def _random_probs(seed: int = 0, n: int = 5, h: int = 17, w: int = 23) -> torch.Tensor:
    """Probabilities with uneven class frequencies, an absent class (5) and many exact ties.

    Integer logits make equal vectors (equal confidences across pixels) and equal maxima
    within a pixel (argmax ties); a few dominant pixels push confidences above the cap.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 4, (n, NUM_CLASSES, h, w), generator=g).float()
    logits[:, 0] += 1.0  # frequent
    logits[:, 3] -= 1.5  # rare
    logits[:, 5] -= 20.0  # never predicted
    spike = torch.rand((n, h, w), generator=g) < 0.15
    logits[:, 1] += 6.0 * spike  # confident (> 0.9) pixels
    return torch.softmax(logits, dim=1)


def _run_estimator(prob: torch.Tensor, shard_batches: list[slice], **kw: object) -> ThresholdEstimator:
    est = ThresholdEstimator(NUM_CLASSES, **kw)  # type: ignore[arg-type]
    for k in range(est.passes):
        est.begin_pass(k)
        for sl in shard_batches:
            est.update(prob[sl])
        est.finish_pass()
    return est


# --------------------------------------------------------------------------- reference


def test_sorted_list_rules_hand_computed() -> None:
    conf = [
        np.array([0.5, 0.7, 0.95, 0.3], np.float32),  # sorted 0.95 0.7 0.5 0.3; k=2 -> 0.7
        np.array([0.99, 0.95, 0.92], np.float32),  # k=1 -> 0.99, capped to 0.9
        np.zeros(0, np.float32),  # absent -> 1
        np.array([0.4], np.float32),  # floor(1 * 0.5) = 0 -> 1
    ]
    t = sorted_list_thresholds(conf, 0.5)
    assert t.dtype == np.float32
    np.testing.assert_array_equal(t, np.array([0.7, 0.9, 1.0, 1.0], np.float32))
    np.testing.assert_array_equal(sorted_list_thresholds(conf, 1.0), np.array([0.3, 0.9, 1.0, 0.4], np.float32))


def test_sorted_list_confidences_every_fourth_per_image_per_class() -> None:
    # one image, 2 classes, 1 x 7 pixels; class 0 at pixels 0,2,3,5,6 -> keep ranks 0 and 4
    p0 = np.array([0.9, 0.2, 0.8, 0.7, 0.4, 0.6, 0.55], np.float32)
    prob = np.stack([p0, 1 - p0])[None, :, None, :]  # 1 x 2 x 1 x 7
    conf = sorted_list_confidences(np.concatenate([prob, prob]), subsample=4)
    np.testing.assert_array_equal(conf[0], np.array([0.9, 0.55, 0.9, 0.55], np.float32))
    np.testing.assert_array_equal(conf[1], np.float32(1) - np.array([0.2, 0.2], np.float32))


# --------------------------------------------------------------------------- exact mode


@pytest.mark.parametrize("portion", [0.2, 0.5, 0.66, 1.0])
@pytest.mark.parametrize("subsample", [1, 3, 4])
def test_exact_reference_equals_sorted_list_bit_for_bit(portion: float, subsample: int) -> None:
    prob = _random_probs()
    ref = sorted_list_thresholds(sorted_list_confidences(prob.numpy(), subsample), portion)
    est = _run_estimator(
        prob, [slice(0, 2), slice(2, 3), slice(3, 5)], portion=portion, mode="exact-reference", subsample=subsample
    )
    t = est.thresholds()
    assert t.dtype == torch.float32
    np.testing.assert_array_equal(_bits(t), _bits(ref))
    assert t[5] == 1.0  # absent class
    counts = np.bincount(prob.argmax(1).reshape(-1).numpy(), minlength=NUM_CLASSES)
    np.testing.assert_array_equal(est.counts.numpy(), counts)
    lens = [c.size for c in sorted_list_confidences(prob.numpy(), subsample)]
    np.testing.assert_array_equal(est.selected_counts.numpy(), lens)


def test_exact_reference_cap_and_small_class_rules() -> None:
    prob = _random_probs(seed=3)
    conf = sorted_list_confidences(prob.numpy(), 4)
    est = _run_estimator(prob, [slice(0, 5)], portion=0.05, mode="exact-reference")
    ref = sorted_list_thresholds(conf, 0.05)
    np.testing.assert_array_equal(_bits(est.thresholds(cap=0.9)), _bits(ref))
    assert ref[1] == np.float32(0.9)  # the confident class hits the cap
    # the rare class is predicted, but floor(5 * 0.05) = 0 selects nothing: t stays 1
    assert conf[3].size == 5 and est.counts[3] > 0 and ref[3] == 1.0
    assert conf[2].size * 0.05 >= 1 and ref[2] < 0.9
    # a tiny portion leaves floor(n q) = 0 for every class: all thresholds stay 1
    tiny = _run_estimator(prob, [slice(0, 5)], portion=1e-6, mode="exact-reference")
    assert torch.equal(tiny.thresholds(), torch.ones(NUM_CLASSES))


def test_exact_reference_rejects_another_portion() -> None:
    est = _run_estimator(_random_probs(), [slice(0, 5)], portion=0.5, mode="exact-reference")
    with pytest.raises(RuntimeError, match="portion 0.5"):
        est.thresholds(0.4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["histogram", "exact-reference"])
def test_cuda_accumulation_matches_cpu_under_deterministic_algorithms(mode: str) -> None:
    prob = _random_probs(seed=5)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        gpu = ThresholdEstimator(NUM_CLASSES, portion=0.5, mode=mode, device="cuda")
        for k in range(gpu.passes):
            gpu.begin_pass(k)
            gpu.update(prob[:2].cuda())
            gpu.update(prob[2:].cuda())
            gpu.finish_pass()
        labels = select_labels(prob.cuda(), gpu.thresholds()).cpu()
    finally:
        torch.use_deterministic_algorithms(was)
    cpu = _run_estimator(prob, [slice(0, 5)], portion=0.5, mode=mode)
    np.testing.assert_array_equal(_bits(gpu.thresholds()), _bits(cpu.thresholds()))
    assert torch.equal(gpu.counts.cpu(), cpu.counts) and torch.equal(labels, select_labels(prob, cpu.thresholds()))


def test_update_rejects_wrong_class_count() -> None:
    est = ThresholdEstimator(NUM_CLASSES)
    with pytest.raises(ValueError, match="N x 6 x H x W"):
        est.update(torch.rand(1, 3, 4, 4))


# --------------------------------------------------------------------------- histogram mode


@pytest.mark.parametrize("bins", [64, 1000, 65536])
@pytest.mark.parametrize("portion", [0.2, 0.5, 0.9])
def test_histogram_within_documented_bound(bins: int, portion: float) -> None:
    prob = _random_probs(seed=1)
    conf = sorted_list_confidences(prob.numpy(), 4)
    exact = sorted_list_thresholds(conf, portion).astype(np.float64)
    est = _run_estimator(prob, [slice(0, 5)], portion=portion, bins=bins)
    approx = est.thresholds().numpy().astype(np.float64)
    slack = 0.0 if bins & (bins - 1) == 0 else 2.0**-24  # float32 rounding of a non-dyadic edge
    assert np.all(exact - approx <= 1.0 / bins + slack)
    assert np.all(approx <= exact + slack)  # the lower bin edge never exceeds the exact value
    assert approx[5] == 1.0
    # the same histogram answers any portion without another pass
    other = est.thresholds(0.3).numpy().astype(np.float64)
    exact_other = sorted_list_thresholds(conf, 0.3).astype(np.float64)
    assert np.all(np.abs(exact_other - other) <= 1.0 / bins + slack)


def test_histogram_threshold_is_bin_lower_edge() -> None:
    # class 0 confidences 0.8, 0.7, 0.6 (subsample 1); q = 2/3 -> 0.7 exactly; 10 bins -> 0.7's bin edge
    p0 = torch.tensor([0.8, 0.7, 0.6])
    prob = torch.stack([p0, 1 - p0]).view(1, 2, 1, 3)
    est = ThresholdEstimator(2, bins=10, subsample=1)
    est.update(prob)  # the first pass starts on its own
    est.finish_pass()
    t = est.thresholds(2 / 3)
    exact = sorted_list_thresholds(sorted_list_confidences(prob.numpy(), 1), 2 / 3)
    assert exact[0] == np.float32(0.7) and exact[1] == 1.0
    # float32(0.7) * 10 = 6.99999988 lands in bin 6 -> edge 0.6
    assert t[0].item() == pytest.approx(0.6) and t[1].item() == 1.0


# --------------------------------------------------------------------------- sharding


def _simulated_all_reduce(estimators: list[ThresholdEstimator]) -> None:
    for tensors in zip(*(e.state_tensors() for e in estimators)):
        total = sum(t.clone() for t in tensors)
        for t in tensors:
            t.copy_(total)


@pytest.mark.parametrize("mode", ["histogram", "exact-reference"])
def test_sharded_accumulation_equals_single_stream(mode: str) -> None:
    prob = _random_probs(seed=2, n=6)
    single = _run_estimator(prob, [slice(0, 6)], portion=0.4, mode=mode, bins=256)
    shards = [[0, 3, 4], [1, 2, 5]]
    ranks = [ThresholdEstimator(NUM_CLASSES, portion=0.4, mode=mode, bins=256) for _ in shards]
    for k in range(single.passes):
        for est, idx in zip(ranks, shards):
            est.begin_pass(k)
            est.update(prob[idx])
        _simulated_all_reduce(ranks)
        for est in ranks:
            est.finish_pass()  # all_reduce is a no-op without torch.distributed
    for est in ranks:
        np.testing.assert_array_equal(_bits(est.thresholds()), _bits(single.thresholds()))
        assert torch.equal(est.counts, single.counts)
        assert torch.equal(est.selected_counts, single.selected_counts)


def test_pass_order_is_enforced() -> None:
    est = ThresholdEstimator(NUM_CLASSES, portion=0.5, mode="exact-reference")
    with pytest.raises(RuntimeError, match="expected pass 0"):
        est.begin_pass(1)
    est.begin_pass(0)
    est.update(_random_probs(n=1))
    est.finish_pass()
    with pytest.raises(RuntimeError, match="still to run"):
        est.thresholds()
    with pytest.raises(UserError, match="portion"):
        ThresholdEstimator(NUM_CLASSES, mode="exact-reference")
    with pytest.raises(UserError, match="unknown pseudo-label mode"):
        ThresholdEstimator(NUM_CLASSES, portion=0.5, mode="median")


# --------------------------------------------------------------------------- selection


def test_select_labels_hand_computed() -> None:
    # 3 classes, 4 pixels; thresholds 0.5, 0.8, 1.0
    prob = torch.tensor(
        [
            [0.60, 0.30, 0.45, 0.20],
            [0.30, 0.64, 0.40, 0.20],
            [0.10, 0.06, 0.15, 0.60],
        ]
    ).view(1, 3, 1, 4)
    t = torch.tensor([0.5, 0.8, 1.0])
    # p/t: px0 (1.2, .375, .1) -> 0; px1 (.6, .8, .06) -> max .8 < 1 -> 255;
    #      px2 (.9, .5, .15) -> 255; px3 (.4, .25, .6) -> 255
    assert select_labels(prob, t).tolist() == [[[0, 255, 255, 255]]]
    t2 = torch.tensor([0.5, 0.6, 0.6])
    # px1 (.6, 1.0667, .1) -> 1; px2 (.9, .667, .25) -> 255; px3 (.4, .333, 1.0) -> 2 (ties to 1 count)
    out = select_labels(prob, t2)
    assert out.dtype == torch.uint8 and out.tolist() == [[[0, 1, 255, 2]]]


def test_select_labels_matches_released_formula() -> None:
    prob = _random_probs(seed=4)
    t = torch.tensor([0.41, 0.9, 0.37, 0.5, 0.33, 1.0])
    p = prob.numpy().transpose(0, 2, 3, 1)  # N x H x W x C as released
    weighted = p / t.numpy()
    expected = np.argmax(weighted, axis=3).astype(np.uint8)
    expected[np.amax(weighted, axis=3) < 1] = 255
    np.testing.assert_array_equal(select_labels(prob, t).numpy(), expected)


# --------------------------------------------------------------------------- generation


class FakeTarget(torch.utils.data.Dataset):
    """Random 3 x H x W images named img_XXX.png; optionally fails after ``fail_after`` reads."""

    def __init__(self, n: int, h: int = 24, w: int = 40, fail_after: int | None = None) -> None:
        self.n, self.h, self.w, self.fail_after, self.reads = n, h, w, fail_after, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, object]:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise OSError(f"simulated crash reading image {i}")
        g = torch.Generator().manual_seed(100 + i)
        return {"image": torch.randn(3, self.h, self.w, generator=g) * 2, "name": f"img_{i:03d}", "index": i}


def _tiny_model(num_classes: int = 4) -> TargetModel:
    torch.manual_seed(0)
    seg = build_segmentor("small", num_classes)
    return TargetModel(seg, build_discoverer(seg.feature_channels)).eval()


def _expected_labels(model: TargetModel, ds: FakeTarget, portion: float, subsample: int) -> dict[str, np.ndarray]:
    with torch.no_grad():
        probs = torch.cat([target_probabilities(model, ds[i]["image"][None]) for i in range(len(ds))])
    t = sorted_list_thresholds(sorted_list_confidences(probs.numpy(), subsample), portion)
    labels = select_labels(probs, torch.from_numpy(t)).numpy()
    return {f"img_{i:03d}": labels[i] for i in range(len(ds))}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_generate_writes_labels_previews_stats_and_marker(tmp_path: Path) -> None:
    model, ds = _tiny_model(), FakeTarget(5)
    out = tmp_path / "pl"
    stats = generate_pseudo_labels(
        model,
        ds,
        out,
        SelfTrainingConfig(portion=0.5, estimator="exact-reference", subsample=4, preview_count=2),
        execution=Execution(progress=False),
    )
    names = [f"img_{i:03d}" for i in range(5)]
    assert _files(out) == (
        {f"{n}.png" for n in names}
        | {f"preview/{n}_color.png" for n in names[:2]}
        | {"stats.json", COMPLETE_NAME, MARKER_NAME}
    )
    assert not list(out.rglob("*.npy"))
    assert pseudo_label_set_complete(out)
    expected = _expected_labels(model, ds, 0.5, 4)
    selected = np.zeros(4, np.int64)
    for n in names:
        png = Image.open(out / f"{n}.png")
        assert png.mode == "L" and png.size == (40, 24)
        lab = np.asarray(png)
        np.testing.assert_array_equal(lab, expected[n])
        selected += np.bincount(lab[lab != 255], minlength=4)
    preview = Image.open(out / "preview" / "img_000_color.png")
    assert preview.mode == "P" and preview.size == (40, 24)
    rgb, lab0 = np.asarray(preview.convert("RGB")), expected["img_000"]
    for c in range(4):
        if (lab0 == c).any():
            assert tuple(rgb[lab0 == c][0]) == CITYSCAPES_COLORS[c]
    if (lab0 == 255).any():
        assert tuple(rgb[lab0 == 255][0]) == (0, 0, 0)
    saved = json.loads((out / "stats.json").read_text())
    assert saved == stats
    assert saved["num_images"] == 5 and saved["mode"] == "exact-reference" and saved["subsample"] == 4
    assert saved["selected_pixels"] == selected.tolist()
    assert sum(saved["predicted_pixels"]) == 5 * 24 * 40
    assert saved["ignored_fraction"] == pytest.approx(1 - selected.sum() / (5 * 24 * 40))
    assert 0.0 < saved["ignored_fraction"] < 1.0
    for key in ("thresholds", "portion", "cap", "bins", "seconds"):
        assert key in saved


def test_generate_histogram_batched_close_to_exact(tmp_path: Path) -> None:
    model, ds = _tiny_model(), FakeTarget(4)
    stats = generate_pseudo_labels(
        model,
        ds,
        tmp_path / "h",
        SelfTrainingConfig(portion=0.5, bins=4096, preview_count=0),
        execution=Execution(batch_size=2, progress=False),
    )
    exact = generate_pseudo_labels(
        model,
        ds,
        tmp_path / "e",
        SelfTrainingConfig(portion=0.5, estimator="exact-reference", preview_count=0),
        execution=Execution(batch_size=2, progress=False),
    )
    assert not (tmp_path / "h" / "preview").exists()
    diff = np.abs(np.array(stats["thresholds"]) - np.array(exact["thresholds"]))
    assert np.all(diff <= 1 / 4096)
    assert stats["predicted_pixels"] == exact["predicted_pixels"]


def test_stale_partial_set_is_regenerated(tmp_path: Path) -> None:
    model, out = _tiny_model(), tmp_path / "pl"
    crashing = FakeTarget(6, fail_after=6 + 3)  # histogram: 6 reads for thresholds, crash while writing
    with pytest.raises(OSError, match="simulated crash"):
        generate_pseudo_labels(
            model, crashing, out, SelfTrainingConfig(portion=0.5, preview_count=0), execution=Execution(progress=False)
        )
    assert not pseudo_label_set_complete(out)
    assert not (out / "stats.json").exists()
    assert 0 < len(list(out.glob("img_*.png"))) < 6
    (out / "img_999.png").write_bytes(b"stale")  # a file a previous round left behind
    (out / "preview").mkdir()
    (out / "preview" / "old_color.png").write_bytes(b"stale")
    generate_pseudo_labels(
        model, FakeTarget(3), out, SelfTrainingConfig(portion=0.5, preview_count=1), execution=Execution(progress=False)
    )
    assert pseudo_label_set_complete(out)
    assert _files(out) == {
        "img_000.png",
        "img_001.png",
        "img_002.png",
        "preview/img_000_color.png",
        "stats.json",
        COMPLETE_NAME,
        MARKER_NAME,
    }


def test_refuses_to_clear_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "photo.png").write_bytes(b"x")
    with pytest.raises(UserError, match="refusing to clear"):
        generate_pseudo_labels(
            _tiny_model(), FakeTarget(1), tmp_path, SelfTrainingConfig(portion=0.5), execution=Execution(progress=False)
        )
    assert (tmp_path / "photo.png").read_bytes() == b"x"


def test_generate_indices_subset_and_module_modes_restored(tmp_path: Path) -> None:
    model = _tiny_model().train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.eval()  # e.g. frozen statistics inside a training model
    stats = generate_pseudo_labels(
        model,
        FakeTarget(5),
        tmp_path / "pl",
        SelfTrainingConfig(portion=0.5, preview_count=0),
        execution=Execution(indices=[4, 1], progress=False),
    )
    assert model.training and model.segmentor.training and not bn.training
    assert stats["num_images"] == 2
    assert sorted(p.name for p in (tmp_path / "pl").glob("*.png")) == ["img_001.png", "img_004.png"]


# --------------------------------------------------------------------------- torch.distributed


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = FakeTarget(5)
        generate_pseudo_labels(
            _tiny_model(),
            ds,
            out_dir,
            SelfTrainingConfig(portion=0.5, estimator="exact-reference", preview_count=1),
            execution=Execution(indices=list(range(rank, 5, world)), progress=False),
        )
    finally:
        dist.destroy_process_group()


def test_distributed_shards_match_single_process(tmp_path: Path) -> None:
    single = generate_pseudo_labels(
        _tiny_model(),
        FakeTarget(5),
        tmp_path / "one",
        SelfTrainingConfig(portion=0.5, estimator="exact-reference", preview_count=1),
        execution=Execution(progress=False),
    )
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert pseudo_label_set_complete(tmp_path / "two")
    for key in ("thresholds", "predicted_pixels", "sampled_pixels", "selected_pixels", "num_images"):
        assert two[key] == single[key], key
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "one" / f"img_{i:03d}.png"))
        b = np.asarray(Image.open(tmp_path / "two" / f"img_{i:03d}.png"))
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- command line


def test_cli_pseudo_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    save_networks(tmp_path / "m.ckpt", build_networks(ModelSpec(arch="small", num_classes=7, norm="unit")))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {arch: small, num_classes: 7}\nsource: {kind: synthetic}\n"
        "target: {kind: synthetic, domain: target, count: 3, size: [40, 24]}\n"
        "self_training: {portion: 0.4, mode: exact-reference, subsample: 2, preview_count: 1}\n"
    )

    calls: list[dict[str, object]] = []
    real_build = datasets.build_dataset

    def build_dataset(ds_cfg: object, **kw: object) -> object:
        calls.append(kw)
        return real_build(ds_cfg, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(datasets, "build_dataset", build_dataset)
    out = tmp_path / "pl"
    code = main(
        [
            "pseudo-label",
            "--checkpoint",
            str(tmp_path / "m.ckpt"),
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--num-workers",
            "0",
        ]
    )
    assert code == 0
    assert calls[0]["norm"] == "unit" and calls[0]["num_classes"] == 7 and calls[0]["with_labels"] is False
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["portion"], stats["mode"], stats["subsample"], stats["num_images"]) == (0.4, "exact-reference", 2, 3)
    assert len(list((out / "preview").iterdir())) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_images"] == 3
    # the labels are where the self-training dataset looks for them
    target = real_build(load_config(cfg).target, norm="unit", num_classes=7, with_labels=False)
    relabelled = datasets.with_label_dir(target, out)
    label = relabelled[0]["label"]
    np.testing.assert_array_equal(label.numpy(), np.asarray(Image.open(out / f"{target.names[0]}.png")))

    code = main(
        [
            "pseudo-label",
            "--checkpoint",
            str(tmp_path / "m.ckpt"),
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--portion",
            "1.5",
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: --portion must be in (0, 1], got 1.5"
    assert pseudo_label_set_complete(out)  # a rejected run leaves the finished set alone
    assert os.path.isfile(out / f"{target.names[0]}.png")


def test_pseudo_label_precision_against_hand_counted_pixels(tmp_path: Path) -> None:
    gts = {
        "a": np.array([[0, 1], [2, 255]], np.uint8),  # 3 valid pixels, one ground-truth ignore
        "b": np.ones((4, 4), np.uint8),  # native 4x4, pseudo label 2x2: resized to it
        "c": np.zeros((2, 2), np.uint8),
    }  # unreadable: no label file, left out
    Image.fromarray(np.array([[0, 0], [255, 2]], np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.array([[1, 1], [1, 0]], np.uint8)).save(tmp_path / "b.png")
    names = list(gts)
    ds = SimpleNamespace(
        num_classes=3,
        names=names,
        table=SimpleNamespace(names=("x", "y", "z")),
        read_label_native=lambda i: gts[names[i]],
    )
    got = pseudo_label_precision(tmp_path, ds)
    # class x: labelled 2 (a) + 1 (b), right 1; class y: 3 labelled, 3 right; z only on an ignore pixel
    assert got["per_class_labelled"] == {"x": 3, "y": 3, "z": 0}
    assert got["per_class_precision"] == {"x": round(100 / 3, 2), "y": 100.0, "z": None}
    assert got["precision"] == round(100 * 4 / 6, 2)
    assert got["labelled_fraction"] == round(100 * 6 / 7, 2)


def test_pseudo_labels_ignore_the_target_augmentation(tmp_path: Path) -> None:
    # labels are made from the images as they are: a target set with flips and colour jitter
    # switched on (for training) gives the same pseudo labels as the same set without them

    model = _tiny_model(7)
    sets = {}
    for name, augment in (("plain", {}), ("augmented", {"flip": True, "brightness": 0.4, "hue": 0.2})):
        cfg = DatasetConfig(
            kind="synthetic", domain="target", count=4, size=(48, 32), with_labels=False, augment=augment
        )
        ds = build_dataset(cfg, norm="unit", num_classes=7, with_labels=False, seed=5)
        assert not torch.equal(ds[0]["image"], ds.prepare_image(0)) or name == "plain"
        generate_pseudo_labels(
            model, ds, tmp_path / name, SelfTrainingConfig(portion=0.5), execution=Execution(progress=False)
        )
        sets[name] = {p.name: np.array(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))}
    assert sets["plain"].keys() == sets["augmented"].keys() and len(sets["plain"]) == 4
    assert all(np.array_equal(sets["plain"][k], sets["augmented"][k]) for k in sets["plain"])
