"""`dast train --dry-run` and `--print-config`, `dast configs NAME`, and what a finished
`dast train` prints and logs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dast.cli import main
from dast.config import load_config, to_yaml
from dast.models.io import ModelSpec, build_networks, save_networks
from dast.training.dry_run import Measurement, StageOutline, due_count

CLASSES = [{"name": "road", "color": [128, 64, 128]}, {"name": "sky", "color": [70, 130, 180]}, {"name": "car"}]


def _folder(root: Path, n: int = 3, labels: bool = True, classes: list | None = None) -> Path:
    rng = np.random.default_rng(len(str(root)))
    (root / "images").mkdir(parents=True)
    if labels:
        (root / "labels").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"f{i}.png")
        if labels:
            Image.fromarray(rng.integers(0, 3, (40, 48), dtype=np.uint8)).save(root / "labels" / f"f{i}.png")
    if classes is not None:
        (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    return root


@pytest.fixture()
def folder_config(tiny_config, tmp_path: Path):
    """A tiny config on folder datasets: a labelled source, an unlabelled target, a labelled val set."""
    _folder(tmp_path / "src", classes=CLASSES)
    _folder(tmp_path / "tgt", labels=False)
    _folder(tmp_path / "val")

    def make(**sections: object) -> Path:
        folder = {
            "model": {"num_classes": 3},
            "source": {"kind": "folder", "root": str(tmp_path / "src"), "size": [48, 40]},
            "target": {"kind": "folder", "root": str(tmp_path / "tgt"), "labels": None, "with_labels": False},
            "val": {"kind": "folder", "root": str(tmp_path / "val"), "size": [48, 40]},
            "selection": {"num_images": 2},
        }
        folder.update(sections)
        return tiny_config("folder.yaml", **folder)

    return make


def _dry(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    code = main(["train", *argv, "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    return code, out, [line.removeprefix("problem: ") for line in out if line.startswith("problem: ")]


def test_a_good_config_passes_with_the_plan_a_time_estimate_and_nothing_written(
    folder_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = folder_config(self_training={"rounds": 1, "steps": 2})
    run = tmp_path / "runs" / "mine"
    code, out, problems = _dry(["--config", str(cfg), "--out", str(run)], capsys)
    assert code == 0 and problems == []
    text = "\n".join(out)
    # the resolved config comes first, as config.yaml will hold it
    assert yaml.safe_load(text.split("\ndatasets:")[0]) == yaml.safe_load(to_yaml(load_config(cfg)))
    assert f"  source  folder     {tmp_path / 'src'}: 3 images, with labels, 3 classes" in out
    assert f"  target  folder     {tmp_path / 'tgt'}: 3 images, labels not used, 3 classes" in out
    # the plan: 4 stage-1 steps, evaluations and checkpoints every 2; a round of 2 steps after labelling the target
    assert "  stage1  4 steps, 2 evaluation(s), 2 checkpoint(s)" in out
    assert "  round1  2 steps, 1 evaluation(s), 1 checkpoint(s), pseudo labels for 3 target images first" in out
    assert "  each evaluation: 4 selection images, 3 val images; then the final model on 3 val images" in out
    timing = next(line for line in out if line.startswith("timing on this CPU"))
    assert re.fullmatch(
        r"timing on this CPU \(1 threads\): 3 stage-1 steps took [\d.]+, [\d.]+, [\d.]+ s \(median [\d.]+ s\)", timing
    )
    assert any(line.startswith("estimated wall time of the whole run on this CPU (1 threads): ") for line in out)
    assert re.search(r"\npeak memory: [\d.]+ GiB \(resident memory of this process\)\n", text)
    assert out[-1] == "dry run: all checks passed; nothing was written"
    assert not (tmp_path / "runs").exists()


def test_the_estimate_adds_steps_evaluations_and_pseudo_labels(tmp_path: Path) -> None:
    m = Measurement(
        device="cpu",
        threads=2,
        stages=(StageOutline("stage1", 100, 4, 4, 0), StageOutline("round1", 50, 2, 1, 20)),
        sizes={"source": 30, "target": 20, "val": 10},
        eval_images={"selection": 8, "val": 10},
        step_seconds=(9.0, 2.0, 3.0),
        image_seconds={"selection": 0.5, "val": 0.25, "pseudo": 0.1},
        final_eval_images=10,
        peak_bytes=1,
        peak_what="x",
    )
    assert m.step == 3.0  # the median: the first step's warm-up does not count
    assert m.seconds() == {
        "training": 3.0 * 150,
        "evaluation": 6 * (8 * 0.5 + 10 * 0.25) + 10 * 0.25,
        "pseudo labels": 20 * 0.1,
    }
    assert [due_count(s, 2) for s in (4, 5, 1, 0)] == [2, 3, 1, 0]


def test_a_missing_root_is_one_problem_naming_the_role_and_the_absolute_path(
    folder_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = folder_config(target={"kind": "folder", "root": "my_camera", "labels": None, "with_labels": False})
    code, out, problems = _dry(["--config", str(cfg), "--out", "run"], capsys)
    assert code == 1
    assert problems == [
        "dataset root not found: my_camera (the target dataset's 'target.root'; relative roots start at the "
        f"working directory: {tmp_path / 'my_camera'})"
    ]
    assert out[-1] == "dry run: 1 problem(s); nothing was timed and nothing was written"
    assert not (tmp_path / "run").exists()
    # dast train itself stops on it too, before the run directory exists
    assert main(["train", "--config", str(cfg), "--out", "run", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {problems[0]}\n"
    assert not (tmp_path / "run").exists()


def test_a_missing_init_file_is_one_problem(folder_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = folder_config()
    init = tmp_path / "weights" / "init.safetensors"
    code, _, problems = _dry(
        ["--config", str(cfg), "--out", str(tmp_path / "run"), "--set", f"model.init={init}"], capsys
    )
    assert (code, problems) == (1, [f"model.init not found: {init}"])
    # an init file for another model is named too
    init.parent.mkdir()
    save_networks(init, build_networks(ModelSpec(arch="small", num_classes=5, norm="unit")))
    code, _, problems = _dry(
        ["--config", str(cfg), "--out", str(tmp_path / "run"), "--set", f"model.init={init}"], capsys
    )
    assert (code, problems) == (1, [f"model.init {init} is for num_classes=5, the config asks for 3"])


def test_class_list_mismatches_are_one_problem_each(
    folder_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "val" / "classes.yaml").write_text(yaml.safe_dump([{"name": "sky"}, {"name": "road"}, {"name": "car"}]))
    cfg = folder_config()
    code, _, problems = _dry(["--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert code == 1
    assert problems == [
        "class lists differ: the source has ['road', 'sky', 'car'], the val ['sky', 'road', 'car']; "
        "the same label value must mean the same class in both"
    ]
    # a class count that is not model.num_classes
    (tmp_path / "val" / "classes.yaml").unlink()
    code, _, problems = _dry(
        ["--config", str(cfg), "--out", str(tmp_path / "run"), "--set", "model.num_classes=4"], capsys
    )
    assert code == 1
    assert problems == [
        f"the source dataset: config key 'model.num_classes' is 4 but {tmp_path / 'src' / 'classes.yaml'} has 3 classes"
    ]


@pytest.mark.parametrize("where", ["under_a_file", "not_empty", "read_only_filesystem"])
def test_an_output_folder_that_cannot_be_used_is_one_problem(
    where: str, folder_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = folder_config()
    if where == "under_a_file":
        (tmp_path / "taken").write_text("a file")
        run, want = tmp_path / "taken" / "run", f"cannot create run directory {tmp_path / 'taken' / 'run'}: "
        want += f"{tmp_path / 'taken'} is a file"
    elif where == "not_empty":
        run = tmp_path / "old"
        run.mkdir()
        (run / "notes.txt").write_text("mine")
        want = f"run directory {run} already exists and is not empty (use --resume to continue it, or --force)"
    else:
        if not sys.platform.startswith("linux"):
            pytest.skip("/proc is Linux's")
        run = Path("/proc/dast-dry-run/run")  # no one may create files in /proc, not even root
        want = f"run directory {run} is not writable: "
    code, _, problems = _dry(["--config", str(cfg), "--out", str(run)], capsys)
    assert code == 1 and len(problems) == 1 and problems[0].startswith(want), problems


def test_several_problems_are_listed_together(
    folder_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = folder_config(source={"kind": "folder", "root": str(tmp_path / "nope"), "size": [48, 40]})
    (tmp_path / "taken").write_text("a file")
    argv = ["--config", str(cfg), "--out", str(tmp_path / "taken"), "--set", "model.init=none.safetensors"]
    code, _, problems = _dry(argv, capsys)
    assert code == 1
    assert [p.split(":")[0] for p in problems] == [
        "dataset root not found",
        "model.init not found",
        f"run directory {tmp_path / 'taken'} exists and is not a directory",
    ]


def test_print_config_and_dast_configs_name_print_the_resolved_config(
    folder_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = folder_config()
    want = to_yaml(load_config(cfg, ["train.steps=9"]))
    assert main(["train", "--config", str(cfg), "--set", "train.steps=9", "--print-config"]) == 0
    assert capsys.readouterr().out == want
    assert main(["configs", str(cfg), "--set", "train.steps=9"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"# {cfg}, resolved (every inherited and default value filled in)"
    assert out.split("\n", 1)[1] == want
    # a building block is merged, not validated (it has no datasets)
    assert main(["configs", "base/common"]) == 0
    block = capsys.readouterr().out
    assert "a building block without source/target datasets" in block.splitlines()[0]
    assert yaml.safe_load(block)["train"]["steps"] == 150000


def test_a_finished_run_prints_the_table_the_model_and_the_next_commands_and_logs_a_header(
    folder_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = folder_config()
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    model = run / "final" / "model.safetensors"
    assert out[0] == f"finished: {run}" and out[1] == "final model on the val set, IoU per class (%):"
    assert out[2].replace(" ", "").startswith("road|sky|car|mIoU")
    assert out[-4:] == [
        f"final model: {model}",
        "next:",
        f"  dast predict --checkpoint {model} --input {tmp_path / 'tgt' / 'images'} --out {run / 'predictions'}",
        f"  dast report {run}",
    ]
    # stderr is not a terminal here: plain progress lines, no bar frames
    assert "\r" not in captured.err
    assert re.search(r"^dast train: stage1 step 4/4 \(\d+ s\)$", captured.err, re.M)
    log = (run / "log.txt").read_text().splitlines()
    heads = [line.split(" INFO ", 1)[1] for line in log[:4]]
    assert heads[0].startswith("dast 0.1.0, torch ") and ", python " in heads[0]
    assert heads[1] == "device cpu, 1 process(es), 1 CPU threads per process"
    assert heads[2] == "datasets: source 3 images, target 3 images, val 3 images"
    assert re.fullmatch(r"config sha256 [0-9a-f]{16} \(config.yaml, resolved\)", heads[3])
