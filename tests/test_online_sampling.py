"""Rare-class sampling: class statistics and their cache, the probabilities against hand
values, the sampler's determinism and eligibility, and the crop rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dast.config import AugmentConfig
from dast.data.datasets import SamplePrep, SegmentationDataset
from dast.data.labels import ClassTable
from dast.errors import ConfigError
from dast.training.online import sampling
from dast.training.online.sampling import (
    RareClassCrops,
    RareClassSampler,
    cache_name,
    cached_class_pixels,
    class_pixel_counts,
    decode_index,
    encode_index,
    first_acceptable,
    label_class_pixels,
    rare_class_crop,
    rcs_plan,
    rcs_probabilities,
)
from dast.training.sampler import StepSampler

TABLE = ClassTable(("a", "b", "c"), ((0, 0, 0), (1, 1, 1), (2, 2, 2)))


class MemorySource:
    """Hand-made label maps (and grey images) held in memory."""

    def __init__(self, labels: list[np.ndarray]) -> None:
        self.labels = labels

    def image(self, j: int) -> np.ndarray:
        return np.full((*self.labels[j].shape, 3), 10 * j, np.uint8)

    def label(self, j: int) -> np.ndarray:
        return self.labels[j]

    def pair(self, j: int, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return self.image(j), (self.label(j) if with_label else None)

    def describe(self, j: int) -> str:
        return f"memory image {j}"


def _labels() -> list[np.ndarray]:
    """Three 4 x 6 maps: class 0 everywhere but a 2 x 2 block of class 2 in image 1 and a
    4 x 3 half of class 1 in image 2 (plus two ignored pixels in image 0)."""
    a = np.zeros((4, 6), np.uint8)
    a[0, :2] = 255
    b = np.zeros((4, 6), np.uint8)
    b[2:, 4:] = 2
    c = np.zeros((4, 6), np.uint8)
    c[:, 3:] = 1
    return [a, b, c]


def _dataset(labels: list[np.ndarray] | None = None, **kw) -> SegmentationDataset:
    labels = labels if labels is not None else _labels()
    return SegmentationDataset(
        MemorySource(labels),
        names=[f"img{i}" for i in range(len(labels))],
        table=TABLE,
        kind="folder",
        has_labels=True,
        prep=SamplePrep(size=None, norm="unit", **kw),
    )


def test_class_pixel_counts_by_image():
    assert label_class_pixels(np.array([[0, 1, 255], [1, 1, 7]]), 3).tolist() == [1, 3, 0]
    counts = class_pixel_counts(_dataset(), show_progress=False)
    assert counts.tolist() == [[22, 0, 0], [20, 0, 4], [12, 12, 0]]
    assert counts.dtype == np.int64
    threaded = class_pixel_counts(_dataset(), workers=2, show_progress=False)
    assert np.array_equal(threaded, counts)


def test_class_statistics_are_cached_beside_the_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "root"
    root.mkdir()
    ds = _dataset()
    counts = cached_class_pixels(ds, root, show_progress=False)
    cache = root / cache_name(ds)
    assert cache.name == "dast_class_pixels_folder_native.json"
    data = json.loads(cache.read_text())
    assert data["names"] == ["img0", "img1", "img2"] and data["pixels"] == counts.tolist()

    def no_recount(*_a, **_k):
        raise AssertionError("counted again although the cache fits")

    monkeypatch.setattr(sampling, "class_pixel_counts", no_recount)
    assert np.array_equal(cached_class_pixels(ds, root, show_progress=False), counts)
    monkeypatch.undo()
    # a different image list invalidates the cache: recomputed and replaced
    fewer = _dataset(_labels()[:2])
    assert cached_class_pixels(fewer, root, show_progress=False).tolist() == [[22, 0, 0], [20, 0, 4]]
    assert json.loads(cache.read_text())["names"] == ["img0", "img1"]


def test_class_statistics_fall_back_to_the_callers_folder(tmp_path: Path):
    not_a_folder = tmp_path / "dataset_root"
    not_a_folder.write_text("a file where the dataset root should be writable")
    fallback = tmp_path / "cache"
    ds = _dataset()
    counts = cached_class_pixels(ds, not_a_folder, fallback, show_progress=False)
    assert (fallback / cache_name(ds)).is_file()
    assert not (tmp_path / cache_name(ds)).exists()
    assert np.array_equal(cached_class_pixels(ds, not_a_folder, fallback, show_progress=False), counts)
    # nowhere to write: the counts are still returned
    assert np.array_equal(cached_class_pixels(ds, not_a_folder, None, show_progress=False), counts)


def test_rcs_probabilities_match_hand_values():
    counts = np.array([[10, 0, 2], [0, 5, 3]])
    # shares f = (10, 5, 5) / 20 = (0.5, 0.25, 0.25); T = 0.5: logits (1 - f) / T = (1, 1.5, 1.5)
    p = rcs_probabilities(counts, temperature=0.5, min_pixels=2)
    z = math.exp(1.0) + 2 * math.exp(1.5)
    assert p.dtype == torch.float64
    assert p.tolist() == pytest.approx([math.exp(1.0) / z, math.exp(1.5) / z, math.exp(1.5) / z])
    # min_pixels 3: class 2's best image has 3 pixels, not more: dropped, the shares stay
    p = rcs_probabilities(counts, temperature=0.5, min_pixels=3)
    z = math.exp(1.0) + math.exp(1.5)
    assert p.tolist() == pytest.approx([math.exp(1.0) / z, math.exp(1.5) / z, 0.0])
    # the published temperature makes the rarer classes dominate
    p = rcs_probabilities(np.array([[900, 100]]), temperature=0.01, min_pixels=0)
    assert p[1] / p[0] == pytest.approx(math.exp((0.9 - 0.1) / 0.01))
    with pytest.raises(ConfigError, match="no class has an image with more than min_pixels=10 pixels"):
        rcs_probabilities(counts, temperature=0.5, min_pixels=10)
    with pytest.raises(ConfigError, match="temperature must be > 0, got 0"):
        rcs_probabilities(counts, temperature=0, min_pixels=1)


def _plan():
    # 6 images, 3 classes; class 2 only in images 1 and 4 with more than 3 pixels
    counts = np.array([[50, 0, 0], [30, 10, 5], [40, 9, 0], [20, 3, 1], [10, 0, 40], [60, 20, 0]])
    return counts, rcs_plan(counts, temperature=0.1, min_pixels=3)


def test_index_encoding_round_trips():
    for image, cls, pos in [(0, 0, 0), (5, 2, 0), (3, 1, 1234567)]:
        i = encode_index(image, cls, pos, 6, 3)
        assert decode_index(i, 6, 3) == (image, cls, pos)
        assert i % 6 == image  # what a dataset reads


def _sampler(plan, **layout) -> RareClassSampler:
    return RareClassSampler(plan, StepSampler(plan.num_images, **layout))


def test_the_sampler_draws_only_images_holding_the_class():
    counts, plan = _plan()
    it = iter(_sampler(plan, batch_size=2, seed=0))
    drawn = [decode_index(next(it), 6, 3) for _ in range(600)]
    for image, cls, _ in drawn:
        assert counts[image, cls] > 3, (image, cls)
    positions = [pos for _, _, pos in drawn]
    assert positions == list(range(600))
    freq = np.bincount([cls for _, cls, _ in drawn], minlength=3) / 600
    assert np.abs(freq - plan.probabilities.numpy()).max() < 0.06
    assert {image for image, cls, _ in drawn if cls == 2} == {1, 4}


def test_the_sampler_depends_only_on_seed_step_rank_and_world():
    _, plan = _plan()

    def take(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    run = take(_sampler(plan, batch_size=2, seed=5), 20)
    assert take(_sampler(plan, batch_size=2, seed=5), 20) == run
    assert take(_sampler(plan, batch_size=2, seed=6), 20) != run
    # resuming at step 4 continues exactly where the first run was
    assert take(_sampler(plan, batch_size=2, seed=5, start_step=4), 12) == run[8:]
    # two ranks with batch 1 see the data of one process with batch 2, as StepSampler
    r0 = take(_sampler(plan, batch_size=1, seed=5, rank=0, world_size=2), 10)
    r1 = take(_sampler(plan, batch_size=1, seed=5, rank=1, world_size=2), 10)
    assert [x for pair in zip(r0, r1) for x in pair] == run
    # the position layout is StepSampler's
    step = StepSampler(6, batch_size=1, seed=0, rank=1, world_size=2, shuffle=False)
    assert [x for x, _ in zip(step.positions(), range(3))] == [x for x, _ in zip(iter(step), range(3))] == [1, 3, 5]
    with pytest.raises(ValueError, match="the layout is for 5 images, the plan for 6"):
        RareClassSampler(plan, StepSampler(5, batch_size=1, seed=0))


def test_first_acceptable_keeps_the_first_crop_that_holds_enough():
    calls: list[int] = []

    def propose(a: int) -> int:
        calls.append(a)
        return [1, 4, 9, 16][a]

    assert first_acceptable(propose, lambda p: p, need=5.0, attempts=4) == (9, 2)
    assert calls == [0, 1, 2]
    assert first_acceptable(lambda a: [1, 4, 9][a], lambda p: p, need=4.0, attempts=3) == (9, 2)  # strict '>'
    assert first_acceptable(lambda a: [1, 4, 9][a], lambda p: p, need=20.0, attempts=3) == (9, 2)  # the last
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        first_acceptable(lambda a: a, lambda p: p, need=1.0, attempts=0)


def test_rare_class_crop_on_a_label_map():
    label = np.zeros((8, 8), np.uint8)
    label[4:, 4:] = 1  # 16 pixels of class 1 in the bottom-right quarter
    boxes = [(0, 0, 4, 4), (2, 2, 4, 4), (4, 4, 4, 4)]  # 0, 4 and 16 pixels of class 1
    # min_pixels 10 at ratio 0.5: more than 5 pixels needed
    assert rare_class_crop(label, 1, boxes.__getitem__, min_pixels=10, min_crop_ratio=0.5) == (4, 4, 4, 4)
    assert rare_class_crop(label, 1, boxes.__getitem__, min_pixels=6, min_crop_ratio=0.5) == (2, 2, 4, 4)
    assert rare_class_crop(label, 1, boxes.__getitem__, min_pixels=100, attempts=2) == (2, 2, 4, 4)


def test_the_dataset_wrapper_redraws_crops_until_the_class_is_in():
    labels = [np.zeros((8, 8), np.uint8) for _ in range(2)]
    labels[1][:3, :3] = 2  # 9 pixels of class 2 in a corner of image 1
    ds = _dataset(labels, augment=AugmentConfig(crop=(4, 4)))
    hits = {}
    for attempts in (1, 10):
        crops = RareClassCrops(ds, min_pixels=8, min_crop_ratio=0.5, attempts=attempts)  # > 4 pixels needed
        hits[attempts] = 0
        for pos in range(100):
            item = crops[encode_index(1, 2, pos, 2, 3)]
            assert item["rcs_class"] == 2 and item["index"] == 1 and item["label"].shape == (4, 4)
            hits[attempts] += int((item["label"] == 2).sum() > 4)
    # a random 4 x 4 crop of 8 x 8 holds more than 4 pixels of the 3 x 3 corner at 3 of its 25
    # positions (12%); with up to 10 draws that becomes 1 - 0.88^10 = 72%
    assert hits[1] <= 25 and hits[10] >= 55
    assert len(crops) == 2 and crops.num_classes == 3
    # without random geometry one draw is made, the item is the base dataset's
    plain = RareClassCrops(_dataset(labels), min_pixels=8)
    item = plain[encode_index(1, 2, 0, 2, 3)]
    assert torch.equal(item["label"], torch.from_numpy(labels[1].astype(np.int64)))
