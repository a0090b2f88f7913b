"""The two labelling rules (ratio, threshold) and pseudo_label_quality, on hand-made maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dast.cli import main
from dast.config import DatasetConfig, SelfTrainingConfig, load_config
from dast.data.datasets import build_dataset
from dast.errors import ConfigError, DataError, UserError
from dast.execution import Execution
from dast.models import build_discoverer, build_segmentor
from dast.models.io import ModelSpec, build_networks, save_networks
from dast.models.target_model import TargetModel
from dast.training.pseudo_labels import (
    ThresholdEstimator,
    generate_pseudo_labels,
    pseudo_label_precision,
    pseudo_label_quality,
    select_labels,
    sorted_list_confidences,
    sorted_list_thresholds,
    target_probabilities,
)

# Ten pixels, three classes, two 1 x 5 images. With subsample 1, portion 0.5, cap 0.9:
#   class 0 is predicted at A E B D C G, confidences .95 .85 .56 .55 .52 .50: k = 3 -> t0 = .56
#   class 1 at H I, .97 .70: k = 1 -> .97, capped -> t1 = .90
#   class 2 at J K, .38 .36: k = 1 -> t2 = .38
PIXELS = {  # name: (p0, p1, p2), ratio label, threshold label
    "A": ((0.95, 0.03, 0.02), 0, 0),
    "B": ((0.56, 0.04, 0.40), 2, 0),  # ratio: .56/.56 = 1 < .40/.38 = 1.05 -> relabelled 2; threshold keeps 0
    "C": ((0.52, 0.02, 0.46), 2, 255),  # ratio: .93 < 1.21 -> relabelled 2; threshold: .52 < .56 -> ignored
    "D": ((0.55, 0.25, 0.20), 255, 255),  # .98, .28, .53 all < 1
    "E": ((0.85, 0.10, 0.05), 0, 0),
    "G": ((0.50, 0.30, 0.20), 255, 255),
    "H": ((0.01, 0.97, 0.02), 1, 1),  # .97/.90 = 1.08
    "I": ((0.20, 0.70, 0.10), 255, 255),  # .36, .78, .26
    "J": ((0.31, 0.31, 0.38), 2, 2),  # exactly at t2 under both rules
    "K": ((0.32, 0.32, 0.36), 255, 255),  # .36/.38 = .95
}
ORDER = "ABCDE", "GHIJK"  # image 0, image 1
THRESHOLDS = (0.56, 0.90, 0.38)


def _hand_probs() -> torch.Tensor:
    """2 x 3 x 1 x 5 float32 probabilities of the two images."""
    return torch.tensor([[PIXELS[p][0] for p in img] for img in ORDER]).permute(0, 2, 1).unsqueeze(2)


def _expected(rule: str) -> list[list[list[int]]]:
    column = 1 if rule == "ratio" else 2
    return [[[PIXELS[p][column] for p in img]] for img in ORDER]


def _estimated(prob: torch.Tensor, mode: str) -> torch.Tensor:
    est = ThresholdEstimator(3, portion=0.5, mode=mode, subsample=1)
    for k in range(est.passes):
        est.begin_pass(k)
        est.update(prob[:1])
        est.update(prob[1:])
        est.finish_pass()
    return est.thresholds(cap=0.9)


# --------------------------------------------------------------------------- rules on the hand-made map


def test_hand_made_thresholds_in_every_method() -> None:
    prob = _hand_probs()
    want = np.array(THRESHOLDS, np.float32)
    ref = sorted_list_thresholds(sorted_list_confidences(prob.numpy(), subsample=1), 0.5, cap=0.9)
    np.testing.assert_array_equal(ref, want)
    np.testing.assert_array_equal(_estimated(prob, "exact-reference").numpy(), want)
    hist = _estimated(prob, "histogram").numpy()  # the lower edge of each value's 1/65536 bin
    assert np.all(hist <= want) and np.all(want - hist < 1 / 65536)


@pytest.mark.parametrize("mode", ["exact-reference", "histogram"])
@pytest.mark.parametrize("rule", ["ratio", "threshold"])
def test_hand_made_labels_under_both_rules_and_modes(rule: str, mode: str) -> None:
    prob = _hand_probs()
    labels = select_labels(prob, _estimated(prob, mode), rule)
    assert labels.dtype == torch.uint8
    assert labels.tolist() == _expected(rule)


def test_ratio_is_the_default_rule_and_unknown_rules_are_refused() -> None:
    prob, t = _hand_probs(), torch.tensor(THRESHOLDS)
    assert torch.equal(select_labels(prob, t), select_labels(prob, t, "ratio"))
    with pytest.raises(UserError, match="unknown pseudo-label rule 'median'"):
        select_labels(prob, t, "median")


def test_threshold_rule_matches_its_formula_and_never_changes_a_class() -> None:
    g = torch.Generator().manual_seed(7)
    prob = torch.softmax(torch.randn(3, 5, 9, 11, generator=g) * 2, dim=1)
    t = torch.tensor([0.41, 0.9, 0.37, 0.5, 1.0])
    p = prob.numpy()
    pred, conf = p.argmax(1), p.max(1)
    expected = np.where(conf >= t.numpy()[pred], pred, 255).astype(np.uint8)
    got = select_labels(prob, t, "threshold").numpy()
    np.testing.assert_array_equal(got, expected)
    kept = got != 255
    assert kept.any() and (~kept).any()
    ratio = select_labels(prob, t, "ratio").numpy()
    assert (ratio[ratio != 255] != pred[ratio != 255]).any()  # the ratio rule does relabel here


def test_rules_differ_exactly_where_ratio_relabels_and_agree_above_one_half() -> None:
    g = torch.Generator().manual_seed(11)
    prob = torch.softmax(torch.randn(4, 6, 13, 9, generator=g) * 3, dim=1)
    argmax = prob.argmax(1)
    low = torch.tensor([0.3, 0.9, 0.2, 0.45, 0.6, 0.35])
    ratio, thr = select_labels(prob, low, "ratio").long(), select_labels(prob, low, "threshold").long()
    relabelled = (ratio != 255) & (ratio != argmax)
    assert relabelled.any()
    assert torch.equal(ratio != thr, relabelled)
    assert torch.equal(thr[thr != 255], argmax[thr != 255])
    high = torch.tensor([0.5, 0.9, 0.51, 0.7, 0.6, 1.0])  # every t_c >= 1/2: nothing can be relabelled
    assert torch.equal(select_labels(prob, high, "ratio"), select_labels(prob, high, "threshold"))


# --------------------------------------------------------------------------- a model whose output is the hand-made map


class HandModel(torch.nn.Module):
    """Returns log p of the hand-made map for image i (its pixels all hold the value i)."""

    def __init__(self, prob: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("log_prob", prob.log())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.log_prob[images[:, 0, 0, 0].long()], None


class HandTarget(torch.utils.data.Dataset):
    """The two 1 x 5 images of the hand-made map, with ground truth (255 = unknown)."""

    GT = ([0, 2, 0, 0, 1], [255, 1, 1, 2, 255])  # A..E, G..K

    def __init__(self, with_labels: bool = True) -> None:
        self.with_labels = with_labels
        self.names = ["img0", "img1"]
        self.num_classes = 3

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"image": torch.full((3, 1, 5), float(i)), "name": self.names[i]}
        if self.with_labels:
            item["label"] = torch.tensor([self.GT[i]], dtype=torch.int64)
        return item

    def read_label_native(self, i: int) -> np.ndarray:
        return np.array([self.GT[i]], np.uint8)


def test_hand_model_gives_the_hand_made_probabilities() -> None:
    prob = _hand_probs()
    got = target_probabilities(HandModel(prob), torch.stack([HandTarget()[i]["image"] for i in range(2)]))
    torch.testing.assert_close(got, prob, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["exact-reference", "histogram"])
@pytest.mark.parametrize("rule", ["ratio", "threshold"])
def test_generate_writes_the_labels_of_the_rule(tmp_path: Path, rule: str, mode: str) -> None:
    model, ds = HandModel(_hand_probs()), HandTarget(with_labels=False)
    stats = generate_pseudo_labels(
        model,
        ds,
        tmp_path,
        SelfTrainingConfig(portion=0.5, estimator=mode, rule=rule, subsample=1, preview_count=0),
        execution=Execution(progress=False),
    )
    for i, name in enumerate(ds.names):
        assert np.asarray(Image.open(tmp_path / f"{name}.png")).tolist() == _expected(rule)[i]
    assert stats["rule"] == rule and json.loads((tmp_path / "stats.json").read_text())["rule"] == rule
    assert stats["selected_pixels"] == ([2, 1, 3] if rule == "ratio" else [3, 1, 1])
    np.testing.assert_allclose(stats["thresholds"], THRESHOLDS, atol=1 / 65536)


def test_generate_refuses_an_unknown_rule_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown pseudo-label rule"):
        generate_pseudo_labels(
            HandModel(_hand_probs()),
            HandTarget(False),
            tmp_path / "pl",
            SelfTrainingConfig.model_construct(portion=0.5, rule="argmax"),  # past the config's own check
            execution=Execution(progress=False),
        )
    assert not (tmp_path / "pl").exists()


# --------------------------------------------------------------------------- pseudo_label_quality


def test_quality_hand_counted() -> None:
    q = pseudo_label_quality(
        HandModel(_hand_probs()),
        HandTarget(),
        SelfTrainingConfig(portion=0.5, estimator="exact-reference", subsample=1),
    )
    assert q["thresholds"] == pytest.approx(THRESHOLDS) and q["num_images"] == 2
    assert q["pixels"] == 8  # G and K have no ground truth
    # ratio: labelled A0 B2 C2 E0 H1 J2 (D, I ignored); right A, B, H, J; B and C are not their argmax
    ratio = q["rules"]["ratio"]
    assert ratio["precision"] == round(100 * 4 / 6, 2) and ratio["labelled_fraction"] == 75.0
    assert ratio["per_class_precision"] == {"0": 50.0, "1": 100.0, "2": round(100 * 2 / 3, 2)}
    assert ratio["per_class_labelled"] == {"0": 2, "1": 1, "2": 3}
    assert ratio["per_class_labelled_fraction"] == {"0": 25.0, "1": 12.5, "2": 37.5}
    assert ratio["relabelled_fraction"] == round(100 * 2 / 6, 2)
    # threshold: labelled A0 B0 E0 H1 J2; right A, H, J; nothing relabelled
    thr = q["rules"]["threshold"]
    assert thr["precision"] == 60.0 and thr["labelled_fraction"] == 62.5
    assert thr["per_class_precision"] == {"0": round(100 / 3, 2), "1": 100.0, "2": 100.0}
    assert thr["per_class_labelled"] == {"0": 3, "1": 1, "2": 1}
    assert thr["per_class_labelled_fraction"] == {"0": 37.5, "1": 12.5, "2": 12.5}
    assert thr["relabelled_fraction"] == 0.0
    json.dumps(q)  # JSON-able


def test_quality_one_rule_histogram_and_batches() -> None:
    q = pseudo_label_quality(
        HandModel(_hand_probs()),
        HandTarget(),
        SelfTrainingConfig(portion=0.5, subsample=1),
        execution=Execution(batch_size=2),
        rules=["threshold"],
    )
    assert list(q["rules"]) == ["threshold"] and q["mode"] == "histogram" and q["bins"] == 65536
    assert q["rules"]["threshold"]["precision"] == 60.0


def test_quality_refuses_bad_input() -> None:
    model = HandModel(_hand_probs())
    with pytest.raises(DataError, match="needs the target labels"):
        pseudo_label_quality(model, HandTarget(with_labels=False), SelfTrainingConfig(portion=0.5))
    with pytest.raises(UserError, match="unknown pseudo-label rule"):
        pseudo_label_quality(model, HandTarget(), SelfTrainingConfig(portion=0.5), rules=["ratio", "best"])
    with pytest.raises(UserError, match="each pseudo-label rule to score once"):
        pseudo_label_quality(model, HandTarget(), SelfTrainingConfig(portion=0.5), rules=["ratio", "ratio"])
    with pytest.raises(UserError, match="portion"):
        pseudo_label_quality(model, HandTarget(), SelfTrainingConfig.model_construct(portion=0.0))


@pytest.mark.parametrize("mode", ["exact-reference", "histogram"])
def test_quality_equals_precision_of_the_written_sets(tmp_path: Path, mode: str) -> None:
    """Scoring from the model and scoring the written PNGs agree, on a real labelled target."""
    torch.manual_seed(0)
    seg = build_segmentor("small", 7)
    model = TargetModel(seg, build_discoverer(seg.feature_channels)).eval()
    target = build_dataset(
        DatasetConfig(kind="synthetic", domain="target", count=3, size=(40, 24)),
        norm="unit",
        num_classes=7,
        with_labels=True,
        seed=3,
    )
    q = pseudo_label_quality(model, target, SelfTrainingConfig(portion=0.5, estimator=mode))
    for rule in ("ratio", "threshold"):
        stats = generate_pseudo_labels(
            model,
            target,
            tmp_path / rule,
            SelfTrainingConfig(portion=0.5, estimator=mode, rule=rule, preview_count=0),
            execution=Execution(progress=False),
        )
        assert q["thresholds"] == stats["thresholds"]
        scored = pseudo_label_precision(tmp_path / rule, target)
        got = q["rules"][rule]
        assert {k: got[k] for k in scored} == scored
        assert list(got["per_class_precision"]) == list(target.table.names)
    labelled = [q["rules"][r]["labelled_fraction"] for r in ("ratio", "threshold")]
    assert labelled[1] <= labelled[0]  # p >= t_c implies p_c / t_c >= 1: threshold labels a subset


# --------------------------------------------------------------------------- config and command line


def test_config_rule_defaults_to_ratio_in_both_variants() -> None:
    cfg = Path(__file__).resolve().parents[1] / "dast" / "configs" / "gta5" / "resnet101" / "dast.yaml"
    for variant in ("paper", "reference"):
        assert load_config(cfg, [f"variant={variant}"]).self_training.rule == "ratio"
    assert load_config(cfg, ["self_training.rule=threshold"]).self_training.rule == "threshold"
    with pytest.raises(ConfigError, match="'self_training.rule' .* should be 'ratio' or 'threshold', got 'argmax'"):
        load_config(cfg, ["self_training.rule=argmax"])


def test_cli_rule_flag_and_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    save_networks(tmp_path / "m.ckpt", build_networks(ModelSpec(arch="small", num_classes=7, norm="unit")))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {arch: small, num_classes: 7}\nsource: {kind: synthetic}\n"
        "target: {kind: synthetic, domain: target, count: 2, size: [40, 24]}\n"
        "self_training: {rule: threshold, preview_count: 0}\n"
    )
    common = [
        "pseudo-label",
        "--checkpoint",
        str(tmp_path / "m.ckpt"),
        "--config",
        str(cfg),
        "--device",
        "cpu",
        "--no-progress",
        "--num-workers",
        "0",
    ]
    assert main([*common, "--out", str(tmp_path / "cfg")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rule"] == "threshold"
    assert main([*common, "--out", str(tmp_path / "flag"), "--rule", "ratio"]) == 0
    assert json.loads((tmp_path / "flag" / "stats.json").read_text())["rule"] == "ratio"
    assert json.loads((tmp_path / "cfg" / "stats.json").read_text())["rule"] == "threshold"
