"""The README's "Your own data" section, run as written: every command of its fenced bash
blocks and its Python block, on a tiny dataset of colour-labelled renderings and unlabelled
camera frames made in tmp_path (the layout its step 1 describes).

The one change: `dast train` (the real run, not the dry run) gets `--set train.steps=2
--set self_training.steps=2` appended, so that the test takes seconds; everything else is
the README's text, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dast.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = [("road", (128, 64, 128)), ("sky", (70, 130, 180)), ("car", (0, 0, 142))]
FAST = ["--set", "train.steps=2", "--set", "self_training.steps=2"]


def own_data_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README's "Your own data" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^( *)```(bash|python)\n(.*?)^\1```", section, re.S | re.M)
    return [(lang, textwrap.dedent(code)) for _, lang, code in blocks]


def commands() -> list[list[str]]:
    """Each `dast ...` line of the section's bash blocks, split as a shell would (comments dropped)."""
    out = []
    for lang, code in own_data_blocks():
        if lang == "bash":
            out += [shlex.split(line, comments=True) for line in code.splitlines() if line.strip()]
    return out


def make_folders(root: Path) -> None:
    """Step 1's layout: colour-labelled renderings with classes.yaml, unlabelled camera frames."""
    rng = np.random.default_rng(0)
    for sub in ("my_renders/images", "my_renders/labels_colour", "my_camera/images"):
        (root / sub).mkdir(parents=True)
    (root / "my_renders/classes.yaml").write_text(
        "".join(f"- {{name: {n}, color: [{c[0]}, {c[1]}, {c[2]}]}}\n" for n, c in CLASSES)
    )
    palette = np.array([c for _, c in CLASSES], np.uint8)
    for i in range(4):
        index = np.zeros((48, 64), np.int64)
        index[: 12 + 2 * i] = 1
        index[30:, 8 + 4 * i : 30 + 4 * i] = 2
        colour = palette[index]
        colour[0, :] = 0  # an unlabelled border, painted black: --ignore-color 0,0,0
        render = np.clip(palette[index] * 0.8 + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
        camera = np.clip(palette[index] * 0.6 + 40 + rng.normal(0, 25, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(render).save(root / f"my_renders/images/render_{i:04d}.png")
        Image.fromarray(colour).save(root / f"my_renders/labels_colour/render_{i:04d}.png")
        Image.fromarray(camera).save(root / f"my_camera/images/frame_{i:04d}.jpg")


def test_the_section_has_every_step() -> None:
    steps = [argv[1] for argv in commands()]
    assert all(argv[0] == "dast" for argv in commands())
    assert steps == ["convert", "check-data", "check-data", "init-config", "train", "train", "report", "predict"]
    assert [lang for lang, _ in own_data_blocks()][-1] == "python"


@pytest.mark.slow
def test_the_readme_own_data_section_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in commands():
        extra = FAST if argv[1] == "train" and "--dry-run" not in argv else []
        code = main([*argv[1:], *extra])
        captured = capsys.readouterr()
        assert code == 0, (argv, captured.out[-2000:], captured.err[-2000:])
        if argv[1] == "init-config":
            cfg = yaml.safe_load(Path(argv[argv.index("--out") + 1]).read_text())
            assert cfg["model"]["num_classes"] == 3 and cfg["source"]["size"] == [64, 48]
        if "--dry-run" in argv:
            assert "dry run: all checks passed; nothing was written" in captured.out
            assert not Path("runs").exists()
    # what the commands left: index labels, a trained run with its report, predictions
    labels = np.asarray(Image.open("my_renders/labels/render_0000.png"))
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2, 255}
    assert Path("runs/mine/final/model.safetensors").is_file() and Path("runs/mine/report.html").is_file()
    assert sorted(p.name for p in Path("preds").glob("frame_*.png") if p.stem.count("_") == 1) == [
        f"frame_{i:04d}.png" for i in range(4)
    ]
    # the Python block, as written
    (code,) = [c for lang, c in own_data_blocks() if lang == "python"]
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    prediction = np.asarray(namespace["labels"])
    assert prediction.shape == (48, 64) and set(np.unique(prediction)) <= {0, 1, 2}
    # and the same labels as `dast predict` wrote
    assert np.array_equal(prediction, np.asarray(Image.open("preds/frame_0001.png")))
