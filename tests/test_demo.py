"""`dast demo --quick` end to end, the demo config's single source of truth, and the
several-seed statistics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY
from PIL import Image

import dast.demo
from dast.cli import main
from dast.config import deep_merge, from_tree, load_config, load_yaml_tree
from dast.data.synthetic import DEMO_SHIFT
from dast.demo import DEMO_CONFIG, RUNS, SHIFTS, VARIANTS, demo_tree, gap_recovered, run_trees, summarize_seeds
from dast.demo.config import timm_overrides
from dast.demo.figures import write_domains_figure
from dast.demo.runner import _train
from dast.models.timm_backbone import install_hint

REPO = Path(__file__).resolve().parents[1]


def test_configs_demo_yaml_is_the_demo_config() -> None:
    assert load_yaml_tree(REPO / "dast" / "configs" / "demo.yaml") == json.loads(json.dumps(DEMO_CONFIG))


@pytest.mark.parametrize("shift", SHIFTS)
def test_demo_shift_reaches_every_dataset_of_every_variant(shift: str) -> None:
    for quick in (False, True):
        trees = run_trees(demo_tree(quick=quick, seed=3, shift=shift))
        for name, tree in trees.items():
            cfg = from_tree(tree, name)
            assert cfg.seed == 3 and cfg.model.output_stride == 4
            assert (cfg.source.shift, cfg.target.shift, cfg.val.shift) == (shift, shift, shift)  # type: ignore[union-attr]
    assert DEMO_CONFIG["source"]["shift"] == DEMO_SHIFT == "photographic"  # demo_tree works on a copy
    assert demo_tree()["target"]["shift"] == "photographic"  # the default: the paper's kind of shift
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
    assert report["seed"] == 1 and report["seconds"] > 0 and report["shift"] == "photographic"  # the demo's default
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
    for v in VARIANTS:  # the reported (label-free selected) snapshot and the last step of each method
        m = report["variants"][v]
        assert m["snapshot"].startswith(("stage1", "round1", "online")) and 0.0 <= m["last"]["miou"] <= 100.0
    assert report["variants"]["dast"]["last"]["snapshot"] == "round1 step 40"
    assert report["variants"]["dast_online"]["last"]["snapshot"] == "online step 40"
    # dast_online continues DA's stage 1 (copied from the dast run, not trained again)
    runs = out / "runs"
    for f in ("selected.safetensors", "checkpoints/step_00000120.safetensors"):
        assert (runs / "dast_online" / "stage1" / f).read_bytes() == (runs / "dast" / "stage1" / f).read_bytes()
    mech = report["mechanisms"]
    assert 0.0 <= mech["attention"]["auroc"] <= 1.0 and mech["attention"]["pixels"] == 24 * 48 * 96
    assert set(mech["discriminators"]) == {"D", "C"}
    assert set(mech["pseudo_labels"]["rules"]) == {"ratio", "threshold"}
    assert "attention AUROC" in printed and "pseudo labels (threshold rule)" in printed
    assert report["already_trained"] == [] and set(report["train_seconds"]) == set(RUNS)
    # run again over the finished runs: the same numbers, and no resume check passed off as training time
    assert main(["demo", "--out", str(out), "--quick", "--seed", "1", "--no-progress"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["variants"] == report["variants"]
    assert sorted(again["already_trained"]) == sorted(RUNS) and again["train_seconds"] == {}


def test_several_seed_summary_by_hand() -> None:
    def report(seed, so_bn, base, dast):
        return {
            "seed": seed,
            "variants": {
                "source_only_bn": {"miou": so_bn, "last": {"miou": so_bn}},
                "baseline": {"miou": base, "last": {"miou": base}},
                "dast": {"miou": dast, "last": {"miou": dast - 1}},
            },
        }

    s = summarize_seeds([report(0, 30.0, 35.0, 40.0), report(1, 32.0, 36.0, 34.0), report(2, 31.0, 37.0, 41.0)])
    assert s["seeds"] == [0, 1, 2]
    assert s["methods"]["dast"]["mean"] == pytest.approx(115 / 3) and s["methods"]["dast"]["per_seed"] == [40, 34, 41]
    assert s["methods"]["dast"]["std"] == pytest.approx(3.7859388972, rel=1e-9)  # sample std
    assert s["methods"]["dast"]["last_mean"] == pytest.approx(115 / 3 - 1)
    vs_base = s["paired"]["dast"]["vs_baseline"]
    assert (
        vs_base["per_seed"] == [5.0, -2.0, 4.0] and vs_base["positive"] == 2 and vs_base["mean"] == pytest.approx(7 / 3)
    )
    assert s["paired"]["baseline"]["vs_source_only_bn"]["per_seed"] == [5.0, 4.0, 6.0]
    assert "vs_baseline" not in s["paired"]["baseline"]


def test_bad_seeds_are_user_errors(capsys, tmp_path: Path) -> None:
    for bad in ("0,x", "1,1", "-3"):
        assert main(["demo", "--out", str(tmp_path / "d"), "--seeds", bad]) == 2
        assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_with_a_timm_backbone_needs_timm_and_writes_nothing_without_it(capsys, tmp_path: Path) -> None:
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here; the missing-package path cannot be checked")
    assert main(["demo", "--out", str(tmp_path / "d"), "--quick", "--timm", "resnet10t", "--no-progress"]) == 2
    assert f"needs the timm package: {install_hint(torch.__version__)}" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_timm_runs_use_the_packaged_demo_timm_model_section() -> None:
    """`dast demo --timm NAME`: every run gets the timm encoder at timm's own stride (the
    demo's output stride 4 is one timm's ResNets refuse), as the packaged demo_timm does."""
    packaged = load_config("demo_timm").model
    for name, tree in run_trees(demo_tree(quick=True, overrides=timm_overrides("resnet10t"))).items():
        model = from_tree(tree, name).model
        assert (model.arch, model.timm_name, model.norm, model.output_stride) == (
            packaged.arch,
            packaged.timm_name,
            packaged.norm,
            packaged.output_stride,
        ), name
    assert packaged.output_stride is None


def test_training_a_run_in_process_restores_the_thread_count(tmp_path: Path) -> None:
    tree = deep_merge(TINY, {"train": {"steps": 2, "eval_every": 2, "checkpoint_every": 2, "image_every": 2}})
    torch.set_num_threads(2)
    _train(tree, tmp_path / "run", None, progress=False)
    assert torch.get_num_threads() == 2  # the run trains on one thread, then gives the caller's back
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.parametrize("shift", SHIFTS)
def test_demo_seeds_cli_trains_every_seed_on_the_chosen_shift(
    shift: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`dast demo --shift S --seeds 0,1`: every seed's demo gets S, and so does every dataset
    of every run it would train (the training itself is replaced by a record of the call)."""
    calls = []

    def fake_run_demo(out, *, quick, seed, progress, workers, shift, overrides):
        used = set()
        for name, tree in run_trees(demo_tree(quick=quick, seed=seed, shift=shift, overrides=overrides)).items():
            cfg = from_tree(tree, name)
            used |= {(d.shift, d.domain) for d in (cfg.source, cfg.target, cfg.val) if d is not None}
        calls.append((Path(out).name, seed, shift, used))
        return {"seed": seed, "variants": {v: {"miou": 40.0 + seed, "last": {"miou": 41.0}} for v in VARIANTS}}

    monkeypatch.setattr(dast.demo, "run_demo", fake_run_demo)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--quick", "--shift", shift, "--seeds", "0,1", "--no-progress"]
    assert main(argv) == 0
    both = {(shift, "source"), (shift, "target")}  # the oracle trains on the target domain
    assert calls == [("seed0", 0, shift, both), ("seed1", 1, shift, both)]
    report = json.loads((out / "report.json").read_text())
    assert report["shift"] == shift and report["seeds"] == [0, 1]
    assert report["per_seed"] == {"0": "seed0/report.json", "1": "seed1/report.json"}
    assert "seeds 0, 1" in capsys.readouterr().out


def test_domains_figure_shows_one_label_column_when_the_domains_share_their_layouts(tmp_path: Path) -> None:
    for shift, columns in (("photographic", 3), ("appearance", 3), ("appearance+layout", 4)):
        path = tmp_path / f"{shift}.png"
        write_domains_figure(path, shift, indices=(0, 1), size=(64, 32))
        with Image.open(path) as im:  # 2.6 inches per column at 100 dpi
            assert im.format == "PNG" and im.size[0] == 260 * columns, shift


def test_a_fork_copies_the_finished_stage1_and_nothing_after_it(tmp_path: Path) -> None:
    from dast.errors import UserError  # noqa: PLC0415 - test-local
    from dast.rundir import RunDir  # noqa: PLC0415 - test-local
    from dast.training.setup import fork_stage1  # noqa: PLC0415 - test-local

    src = RunDir(tmp_path / "src")
    (src.stage("stage1").checkpoints).mkdir(parents=True)
    src.config.write_text("seed: 0\n")
    with pytest.raises(UserError, match="its stage 1 is not complete"):
        fork_stage1(src.root, tmp_path / "dst")
    src.stage("stage1").selected.write_bytes(b"weights")
    (src.stage("round1").root).mkdir(parents=True)
    src.manifest.write_text(json.dumps({"stages": {"stage1": {"status": "complete", "steps": 4}, "round1": {}}}))
    src.curves.write_text(json.dumps([{"stage": "stage1", "step": 4}, {"stage": "round1", "step": 2}]))
    src.scalars.write_text('{"step": 4, "a": 1}\n{"step": 6, "a": 2}\n')
    fork_stage1(src.root, tmp_path / "dst")
    dst = RunDir(tmp_path / "dst")
    assert dst.stage("stage1").selected.read_bytes() == b"weights" and not dst.stage("round1").root.exists()
    assert json.loads(dst.manifest.read_text()) == {"stages": {"stage1": {"status": "complete", "steps": 4}}}
    assert json.loads(dst.curves.read_text()) == [{"stage": "stage1", "step": 4}]
    assert dst.scalars.read_text() == '{"step": 4, "a": 1}\n'
    with pytest.raises(UserError, match="it exists"):
        fork_stage1(src.root, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temporary folder left


def test_forked_runs_wait_for_their_parent_and_are_skipped_when_it_fails(monkeypatch, tmp_path: Path) -> None:
    from dast.demo import runner  # noqa: PLC0415 - patched below
    from dast.errors import NumericalFault  # noqa: PLC0415 - test-local

    calls: list[tuple[str, str | None]] = []

    def fake(tree, run_dir, label, progress, force=False, fork=None):
        calls.append((run_dir.name, fork.name if fork is not None else None))
        if tree.get("fail"):
            raise NumericalFault("diverged")
        return 1.0

    monkeypatch.setattr(runner, "_train", fake)
    trees = {"a": {}, "b": {"fail": True}, "a_child": {}, "b_child": {}, "c_child": {}}
    failures: dict[str, str] = {}
    forks = {"a_child": "a", "b_child": "b", "c_child": "c"}  # c: a finished run already in the folder
    seconds = runner.train_runs(trees, tmp_path, 1, False, failures=failures, forks=forks)
    assert calls == [("a", None), ("b", None), ("a_child", "a"), ("c_child", "c")]
    assert set(seconds) == {"a", "a_child", "c_child"} and failures == {"b": "diverged"}


def test_a_stage1_is_complete_when_the_manifest_says_so_and_its_snapshot_is_there(tmp_path: Path) -> None:
    from dast.demo.runner import stage1_complete  # noqa: PLC0415 - test-local
    from dast.rundir import RunDir  # noqa: PLC0415 - test-local

    run = RunDir(tmp_path / "run")
    assert not stage1_complete(run.root)  # nothing yet
    run.stage("stage1").root.mkdir(parents=True)
    run.manifest.write_text(json.dumps({"stages": {"stage1": {"status": "running"}}}))
    run.stage("stage1").selected.write_bytes(b"x")
    assert not stage1_complete(run.root)
    run.manifest.write_text(json.dumps({"stages": {"stage1": {"status": "complete", "steps": 4}}}))
    assert stage1_complete(run.root)
    run.manifest.write_text('{"stages": {"stage1": {"status": "comp')  # a manifest being written
    assert not stage1_complete(run.root)
