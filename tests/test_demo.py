"""`dast demo --quick` end to end, and the demo config's single source of truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dast.cli import main
from dast.config import load_yaml_tree
from dast.demo import DEMO_CONFIG, VARIANTS, demo_tree, gap_recovered, variant_trees

REPO = Path(__file__).resolve().parents[1]


def test_configs_demo_yaml_is_the_demo_config() -> None:
    assert load_yaml_tree(REPO / "configs" / "demo.yaml") == json.loads(json.dumps(DEMO_CONFIG))


@pytest.mark.parametrize("shift", ["appearance", "appearance+layout"])
def test_demo_shift_reaches_every_dataset_of_every_variant(shift: str) -> None:
    from dast.config import from_tree

    for quick in (False, True):
        trees = variant_trees(demo_tree(quick=quick, seed=3, shift=shift))
        for name, tree in trees.items():
            cfg = from_tree(tree, name)
            assert cfg.seed == 3 and cfg.model.output_stride == 4
            assert (cfg.source.shift, cfg.target.shift, cfg.val.shift) == (shift, shift, shift)  # type: ignore[union-attr]
    assert DEMO_CONFIG["source"]["shift"] == "appearance"  # demo_tree works on a copy
    with pytest.raises(ValueError, match="unknown domain shift 'layout'"):
        demo_tree(shift="layout")


def test_demo_cli_rejects_an_unknown_shift(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "d"), "--shift", "layout"])
    assert exc.value.code == 2
    assert "error: argument --shift: invalid choice: 'layout'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_gap_recovered() -> None:
    assert gap_recovered(30.0, 20.0, 40.0) == pytest.approx(50.0)
    assert gap_recovered(20.0, 20.0, 20.0) is None


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--seed", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["variants"]) == set(VARIANTS)
    assert report["seed"] == 1 and report["seconds"] > 0 and report["shift"] == "appearance"
    for v in VARIANTS:
        m = report["variants"][v]
        assert 0.0 <= m["miou"] <= 100.0
        assert list(m["per_class"]) == ["road", "sidewalk", "building", "vegetation", "sky", "person", "car"]
        assert v in printed
    for fig in report["figures"]:
        with Image.open(out / fig) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert "mIoU" in printed
    pl = report["pseudo_labels"]  # round 1's labels scored against the synthetic target labels
    assert 0.0 <= pl["precision"] <= 100.0 and 0.0 < pl["labelled_fraction"] <= 100.0
    assert list(pl["per_class_precision"]) == list(report["variants"]["dast"]["per_class"])
    assert "round-1 pseudo labels:" in printed
