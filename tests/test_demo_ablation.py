"""benchmarks/demo_ablation.py: the Table-3 rows on the demo config, on any synthetic shift."""

from __future__ import annotations

import copy

import helpers
import pytest

from dast.config import deep_merge, from_tree
from dast.data.synthetic import SHIFTS
from dast.demo import DEMO_CONFIG


@pytest.fixture(scope="module")
def ablation():
    return helpers.benchmark_module("demo_ablation")


def test_rows_without_a_shift_are_the_demo_config_as_before(ablation) -> None:
    # the rows as the script built them before it took --shift: DEMO_CONFIG, stage 1 only, the
    # seed; the baseline's lambda is the demo baseline's on the demo's (photographic) domains
    before = deep_merge(copy.deepcopy(DEMO_CONFIG), {"self_training": {"rounds": 0}, "seed": 3})
    trees = ablation.row_trees(3)
    assert list(trees) == ["baseline", "mse", "mse_baseline_lambda", "mse_2d", "da"]
    lam = {"adversarial": {"lambda_c": 0.003}}
    for name, change in ablation.ROWS.items():
        want = deep_merge(before, change)
        assert trees[name] == (deep_merge(want, lam) if "baseline" in name else want), name
    assert ablation.row_trees(3, "appearance")["baseline"]["adversarial"]["lambda_c"] == 0.01


def test_the_ablation_baseline_is_the_demo_baseline_on_every_shift(ablation) -> None:
    from dast.demo import demo_tree, run_trees  # noqa: PLC0415 - test-local

    for shift in SHIFTS:
        row = from_tree(ablation.row_trees(5, shift)["baseline"], "row").model_dump()
        demo = from_tree(run_trees(demo_tree(seed=5, shift=shift))["baseline"], "demo").model_dump()
        assert {k: v for k, v in row.items() if k != "self_training"} == {
            k: v for k, v in demo.items() if k != "self_training"
        }, shift


@pytest.mark.parametrize("shift", SHIFTS)
def test_rows_train_on_the_chosen_shift(ablation, shift: str) -> None:
    for name, tree in ablation.row_trees(0, shift).items():
        cfg = from_tree(tree, name)
        assert (cfg.source.shift, cfg.target.shift, cfg.val.shift) == (shift, shift, shift), name  # type: ignore[union-attr]
        assert cfg.self_training.rounds == 0
    plain = ablation.row_trees(0)["da"]
    shifted = ablation.row_trees(0, shift)["da"]
    for part in ("source", "target", "val"):
        shifted[part]["shift"] = plain[part]["shift"]
    assert shifted == plain  # nothing else changes


def test_ablation_rejects_an_unknown_shift(ablation, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ablation.main(["--seeds", "0", "--shift", "layout"])
    assert exc.value.code == 2 and "invalid choice: 'layout'" in capsys.readouterr().err
