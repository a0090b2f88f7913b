"""Config loading, validation, overrides and the error line for an unknown key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dast.cli import main
from dast.config import ConfigError, apply_overrides, config_diff, from_tree, load_config, load_yaml_tree

REPO = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted(p for p in (REPO / "dast" / "configs").rglob("*.yaml") if "base" not in p.parts)


def test_there_is_a_config_per_paper_row() -> None:
    names = {str(p.relative_to(REPO / "dast" / "configs")) for p in ALL_CONFIGS}
    for pair in ("gta5", "synthia"):
        for arch in ("resnet101", "vgg16"):
            for row in ("source_only", "baseline", "mse", "mse_2d", "da", "dast"):
                assert f"{pair}/{arch}/{row}.yaml" in names
    assert "demo.yaml" in names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "dast" / "configs")))
def test_every_config_validates_and_names_its_paper_row(path: Path) -> None:
    cfg = load_config(path)
    head = path.read_text().splitlines()[:2]
    if path.stem.endswith("_online"):  # this project's additions: one online self-training stage
        assert head[0].startswith("# ") and head[1].startswith("# Not a paper row:")
        assert cfg.self_training.mode == "online" and cfg.self_training.steps == 40000
        assert cfg.train.steps == (0 if path.stem.startswith("source_only") else 150000)
    elif not path.stem.startswith("demo"):  # demo.yaml, demo_timm.yaml: the synthetic demo
        assert head[0].startswith("# ") and head[1].startswith("# Paper row:")
        assert cfg.train.steps == 150000 and cfg.train.poly_steps == 250000
    if path.stem == "dast":
        assert cfg.self_training.rounds == 3 and cfg.self_training.portion == 0.5
    if path.stem == "baseline":
        assert cfg.adversarial.loss == "bce" and not cfg.adversarial.discoverer and cfg.adversarial.lambda_c == 0.001
    if path.stem == "da":
        assert cfg.adversarial.attention and cfg.adversarial.discoverer and cfg.adversarial.corrector


def test_variant_defaults_resolve() -> None:
    cfg = REPO / "dast/configs/gta5/resnet101/dast.yaml"
    paper = load_config(cfg)
    ref = load_config(cfg, ["variant=reference"])
    # the paper's text weights the segmentor's L_adv^C(E,P) only; the release weights nothing
    assert paper.adversarial.corrector_weighting == "segmentor" and ref.adversarial.corrector_weighting == "none"
    # the release trains its rounds with BatchNorm in eval mode
    assert paper.self_training.batchnorm == "train" and ref.self_training.batchnorm == "frozen"
    old_name = load_config(cfg, ["adversarial.corrector_weighting=attention"])  # run dirs written before the split
    assert old_name.adversarial.corrector_weighting == "both"
    assert paper.train.duplicate_params is False and ref.train.duplicate_params is True
    assert ref.self_training.lr == 2e-4 and ref.self_training.head_lr_mult == 1.0
    assert paper.self_training.head_lr_mult == 10.0
    vgg = load_config(REPO / "dast/configs/gta5/vgg16/da.yaml", ["variant=reference"])
    assert vgg.train.duplicate_params is False and vgg.train.head_lr_mult == 1.0
    assert set(config_diff(paper, ref)) >= {"variant", "adversarial.corrector_weighting", "train.duplicate_params"}


def test_overrides_parse_yaml_values() -> None:
    tree = apply_overrides(
        load_yaml_tree(REPO / "dast/configs/demo.yaml"),
        ["train.steps=7", "selection.betas=[0.25]", "adversarial.lr=3e-4"],
    )

    cfg = from_tree(tree)
    assert cfg.train.steps == 7 and cfg.selection.betas == [0.25] and cfg.adversarial.lr == 3e-4


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.stpes=3", "unknown config key 'train.stpes' in --set (did you mean 'train.steps'?)"),
        ("train.steps=many", "config key 'train.steps'"),
        ("model.arch=resnet50", "config key 'model.arch'"),
        ("trian.steps=3", "did you mean 'train"),
        (
            "model.output_stride=16",
            (
                "error: config key 'model.output_stride': output stride 16 is not supported by "
                "the small architecture (supported: 4, 8)"
            ),
        ),
        ("source.shift=layout", "config key 'source.shift'"),
    ],
)
def test_bad_override_is_one_line_error(override: str, fragment: str, tmp_path: Path, capsys) -> None:
    code = main(
        ["train", "--config", str(REPO / "dast/configs/demo.yaml"), "--out", str(tmp_path / "run"), "--set", override]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_file_names_it(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "dast/configs/demo.yaml").read_text() + "\nselection:\n  num_imgs: 3\n")
    code = main(["train", "--config", str(bad), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "selection.num_imgs" in err and "did you mean 'selection.num_images'" in err
    assert "Traceback" not in err


def test_extends_chain_and_missing_parent(tmp_path: Path) -> None:
    (tmp_path / "child.yaml").write_text("extends: nowhere.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "child.yaml")


def test_the_old_threshold_mode_key_is_read_as_the_estimator() -> None:
    from dast.config import SelfTrainingConfig  # noqa: PLC0415 - test-local

    assert SelfTrainingConfig.model_validate({"mode": "exact-reference"}).estimator == "exact-reference"
    assert SelfTrainingConfig.model_validate({"estimator": "histogram"}).estimator == "histogram"
    assert SelfTrainingConfig().estimator == "histogram"
