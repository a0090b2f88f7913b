"""benchmarks/demo_sweep.py: each setting means what its name says, whatever the demo's
current defaults (which this sweep chose)."""

from __future__ import annotations

from pathlib import Path

import helpers
import pytest

from dast.config import from_tree
from dast.data.synthetic import SHIFTS


@pytest.fixture(scope="module")
def sweep():
    return helpers.benchmark_module("demo_sweep")


def _adv(tree: dict) -> tuple:
    cfg = from_tree(tree, "sweep")
    return cfg.train.lr, cfg.adversarial.lr, cfg.adversarial.lambda_d, cfg.adversarial.lambda_c


def test_stage1_rows_pin_the_values_they_name(sweep) -> None:
    trees = sweep.stage1_trees([100], quick=True, shift=None)
    assert _adv(trees["old_demo__lr_0_01__D_C_lr_1e_4__ratio_100___lambda_0_01_s100"]) == (0.01, 1e-4, 0.01, 0.01)
    assert _adv(trees["lr_0_0025__ratio_2_5__lambda_0_01_s100"]) == (0.0025, 0.001, 0.01, 0.01)
    assert _adv(trees["lr_0_0025__ratio_2_5__lambda_0_03_s100"]) == (0.0025, 0.001, 0.03, 0.03)
    # the per-row baseline is AdaptSegNet with its published lambda; the lambda grid varies it
    baseline = from_tree(trees["lr_0_0025__ratio_2_5__lambda_0_01_s100_baseline"], "b").adversarial
    assert (baseline.loss, baseline.lambda_c, baseline.discoverer) == ("bce", 0.001, False)
    assert from_tree(trees["baseline_lambda0.03_s100"], "b").adversarial.lambda_c == 0.03
    warm = from_tree(trees["lr_0_0025__ratio_2_5__lambda_0_01__warm_up_s100"], "w").adversarial
    plain = from_tree(trees["lr_0_0025__ratio_2_5__lambda_0_01_s100"], "p").adversarial
    assert warm.warmup_steps > 0 and plain.warmup_steps == 0
    assert all(from_tree(t, n).self_training.rounds == 0 for n, t in trees.items())


def test_self_training_rows_pin_the_batchnorm_mode_and_rate(sweep) -> None:
    trees = sweep.self_training_trees([100], quick=True, shift=None, stage1_setting="lr 0.0025, ratio 2.5, lambda 0.03")
    st = {name: from_tree(tree, name).self_training for name, tree in trees.items()}
    base = st["base__BN_train__lr_0_0025____stage_1___300_steps__q_0_5__rat_s100"]
    assert (base.batchnorm, base.lr, base.portion, base.rule, base.rounds) == ("train", 0.0025, 0.5, "ratio", 1)
    assert (st["lr_0_0005_s100"].batchnorm, st["lr_0_0005_s100"].lr) == ("train", 0.0005)
    assert (st["BN_frozen__lr_0_0003_s100"].batchnorm, st["BN_frozen__lr_0_0003_s100"].lr) == ("frozen", 0.0003)
    assert st["q_0_3_s100"].portion == 0.3 and st["threshold_rule_s100"].rule == "threshold"
    # every round starts from the chosen stage 1
    assert {_adv(t) for t in trees.values()} == {(0.0025, 0.001, 0.03, 0.03)}


def test_sweep_takes_every_shift(sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for shift in SHIFTS:
        trees = sweep.stage1_trees([100], quick=True, shift=shift)
        trees.update(sweep.self_training_trees([100], True, shift, "lr 0.0025, ratio 2.5, lambda 0.03"))
        for name, tree in trees.items():
            cfg = from_tree(tree, name)
            assert {d.shift for d in (cfg.source, cfg.target, cfg.val) if d is not None} == {shift}, name
    with pytest.raises(SystemExit) as exc:
        sweep.main(["stage1", "--work", str(tmp_path), "--shift", "layout"])
    assert exc.value.code == 2 and "invalid choice: 'layout'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
