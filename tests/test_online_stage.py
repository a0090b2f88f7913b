"""The online stage in a run: its plan, the teacher's EMA by hand, bitwise resume with the
teacher, rare-class sampling in the loader, and the packaged online configs on GTA5 and
Cityscapes-layout fixtures."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from test_datasets import make_cityscapes, make_gta5

from dast.checkpoint import load_checkpoint, read_meta
from dast.cli import main
from dast.config import deep_merge, from_tree, load_config, resolve
from dast.rundir import RunDir
from dast.training.pipeline import train
from dast.training.plans import stage_plans

ONLINE = {"self_training": {"mode": "online", "steps": 4, "online": {"threshold": 0.2}}}


def _config(**sections):
    return resolve(from_tree(deep_merge(deep_merge(copy.deepcopy(TINY), ONLINE), sections), "test"))


def test_an_online_run_plans_stage1_then_one_online_stage() -> None:
    cfg = _config(self_training={"online": {"adversarial": "drop"}, "lr": 0.003, "eval_every": 2})
    stage1, online = stage_plans(cfg, 1)
    assert (stage1.name, stage1.kind) == ("stage1", "adversarial")
    assert (online.name, online.kind, online.index, online.steps) == ("online", "online", 1, 4)
    assert (online.lr, online.eval_every, online.global_offset) == (0.003, 2, 4)
    assert not online.adversarial and not online.pseudo_labels and online.batchnorm == "train"
    assert stage_plans(_config(), 1)[1].adversarial  # keep: DA's discriminators go on training
    assert [p.kind for p in stage_plans(_config(self_training={"mode": "rounds", "rounds": 2}), 1)] == [
        "adversarial",
        "round",
        "round",
    ]


def _teacher(path: Path) -> dict[str, torch.Tensor]:
    tensors, meta = load_checkpoint(path)
    refs = meta["hooks"]["teacher"]["weights"]
    return {k: tensors[v["$tensor"]] for k, v in refs.items()}


def test_the_teacher_is_the_ema_of_the_student_by_hand(tmp_path: Path) -> None:
    """After the online stage's first step the teacher weighs min(1 - 1/2, 0.999) = 1/2: it is
    the mean of its start (stage 1's selected model) and the student after one update."""
    cfg = _config(self_training={"steps": 1}, train={"checkpoint_every": 1})
    train(cfg, tmp_path / "run", progress=False)
    run = RunDir(tmp_path / "run")
    start, _ = load_checkpoint(run.stage("stage1").selected)
    student, _ = load_checkpoint(run.stage("online").checkpoint(1))
    teacher = _teacher(run.stage("online").checkpoint(1))
    checked = 0
    for name, value in teacher.items():
        if name.startswith("segmentor.") and value.is_floating_point() and "running" not in name:
            want = 0.5 * start[name] + 0.5 * student[name]
            torch.testing.assert_close(value, want, rtol=0, atol=1e-6)
            checked += 1
    assert checked > 20
    head = "segmentor.classifier.conv2d_list.0.weight"
    assert not torch.equal(start[head], student[head])  # the student moved: the test can tell the two apart


def test_an_interrupted_online_stage_resumes_bitwise_with_its_teacher(tmp_path: Path) -> None:
    cfg = _config(self_training={"steps": 4, "online": {"masking": {"ratio": 0.5, "block": 8}}})
    train(cfg, tmp_path / "whole", progress=False)
    short = cfg.model_copy(deep=True)
    short.self_training.steps = 2
    train(short, tmp_path / "parts", progress=False)  # the online stage stops after 2 steps ...
    train(cfg, tmp_path / "parts", resume=True, progress=False)  # ... and goes on to 4
    whole, parts = RunDir(tmp_path / "whole"), RunDir(tmp_path / "parts")
    a, _ = load_checkpoint(whole.stage("online").checkpoint(4))
    b, _ = load_checkpoint(parts.stage("online").checkpoint(4))
    weights = [k for k in a if k.split(".")[0] in ("segmentor", "discoverer", "corrector")]
    assert len(weights) > 20 and all(torch.equal(a[k], b[k]) for k in weights)
    ta, tb = _teacher(whole.stage("online").checkpoint(4)), _teacher(parts.stage("online").checkpoint(4))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert read_meta(parts.stage("online").checkpoint(4))["stage_state"]["step"] == 4


def test_rare_class_sampling_feeds_the_loader_and_caches_its_statistics(tmp_path: Path) -> None:
    cfg = _config(
        source={"rare_class_sampling": {"temperature": 0.5, "min_pixels": 20}},
        self_training={"steps": 1},
        train={"steps": 1},
    )
    train(cfg, tmp_path / "run", progress=False)
    cached = list((tmp_path / "run").glob("dast_class_pixels_*.json"))  # generated data: in the run folder
    assert len(cached) == 1 and yaml.safe_load(cached[0].read_text())["num_classes"] == 7


@pytest.mark.parametrize("name", ["gta5/resnet101/dast_online", "gta5/resnet101/source_only_online"])
def test_the_packaged_online_configs_train_two_steps_on_fixtures(tmp_path: Path, name: str) -> None:
    make_gta5(tmp_path / "GTA5", n=3)
    make_cityscapes(tmp_path / "Cityscapes", split="train")
    make_cityscapes(tmp_path / "Cityscapes", split="val")
    sets = {
        "model.init": "null",
        "source.root": str(tmp_path / "GTA5"),
        "source.size": "[80, 48]",  # the source's size differs from the target's: ClassMix resizes it
        "source.rare_class_sampling.min_pixels": "10",
        "target.root": str(tmp_path / "Cityscapes"),
        "target.size": "[64, 32]",
        "val.root": str(tmp_path / "Cityscapes"),
        "val.size": "[64, 32]",
        "train.steps": "2" if "dast" in name else "0",
        "train.num_workers": "0",
        "train.checkpoint_every": "2",
        "train.eval_every": "2",
        "self_training.steps": "2",
        "self_training.eval_every": "2",
        "self_training.online.ignore_bottom": "4",
        "selection.num_images": "2",
    }
    args = ["train", "--config", name, "--out", str(tmp_path / "run"), "--no-progress"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    run = RunDir(tmp_path / "run")
    assert run.finished() and (run.stage("online").checkpoint(2)).is_file()
    meta = read_meta(run.stage("online").checkpoint(2))
    assert meta["hooks"]["teacher"]["weights"] and load_config(name).self_training.mode == "online"
