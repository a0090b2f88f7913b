"""benchmarks/online_ablation.py: its rows' configs, and the summary by hand."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest

from dast.config import from_tree
from dast.demo import demo_tree, run_trees
from dast.demo.config import online_overrides
from dast.rundir import DemoDir


@pytest.fixture(scope="module")
def ablation():
    return helpers.benchmark_module("online_ablation")


def test_each_row_changes_only_what_it_names(ablation, tmp_path: Path) -> None:
    demo = DemoDir(tmp_path / "seed4")
    demo.root.mkdir()
    demo.report_json.write_text(json.dumps({"seed": 4, "quick": False, "shift": "appearance"}))
    rows, parents = ablation.seed_trees(demo, 4)
    assert parents == {
        "from_source_only": "source_only",
        "from_baseline": "baseline",
        "from_da_drop": "dast",
        "from_da_no_classmix": "dast",
        "from_da_rcs": "dast",
        "from_da_masking": "dast",
    }
    demo_online = from_tree(run_trees(demo_tree(seed=4, shift="appearance"))["dast_online"], "dast_online")
    for name, tree in rows.items():
        cfg = from_tree(tree, name)
        assert cfg.seed == 4 and cfg.target.shift == "appearance" and cfg.self_training.mode == "online"
        assert cfg.self_training.steps == online_overrides()["self_training"]["steps"]
    on = {name: from_tree(tree, name).self_training.online for name, tree in rows.items()}
    assert on["from_da_drop"].adversarial == "drop" and not on["from_da_no_classmix"].classmix
    assert on["from_da_masking"].masking is not None and on["from_da_masking"].masking.ratio == 0.7
    rcs = from_tree(rows["from_da_rcs"], "rcs").source.rare_class_sampling
    assert rcs is not None and rcs.temperature == 0.01
    # from DA with only the masking switched on is the demo's own dast_online run plus that switch
    masked = from_tree(rows["from_da_masking"], "m").model_dump()
    masked["self_training"]["online"]["masking"] = None
    assert masked == demo_online.model_dump()
    assert not from_tree(rows["from_source_only"], "so").adversarial.discoverer


def test_the_summary_by_hand(ablation) -> None:
    per = {
        "0": {"from_da": {"miou": 50.0, "last": 49.0}, "from_source_only": {"miou": 46.0, "last": 44.0}},
        "1": {"from_da": {"miou": 52.0, "last": 51.0}, "from_source_only": {"miou": 53.0, "last": 50.0}},
    }
    s = ablation.summarize(per)
    assert s["from_source_only"]["mean"] == 49.5 and s["from_source_only"]["last_mean"] == 47.0
    assert s["from_source_only"]["vs_from_da"] == {"mean": -1.5, "higher": 1}  # -4 and +1
    assert s["from_da"]["vs_from_source_only"] == {"mean": 1.5, "higher": 1}
    assert "| from_source_only | 49.5 ± 4.9 | 47.0 |  | -1.5 (1/2) |" in ablation.table(s, 2)
