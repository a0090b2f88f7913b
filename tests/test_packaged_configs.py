"""Configs inside the package: `--config NAME`, `extends:` by name, `paper:` blocks, `dast configs`."""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from dast.cli import main
from dast.config import (
    PACKAGED_CONFIG_DIR,
    ConfigError,
    load_config,
    load_yaml_tree,
    packaged_config_names,
    read_paper_row,
    resolve_config_path,
)

REPO = Path(__file__).resolve().parents[1]
ROWS = ("source_only", "baseline", "mse", "mse_2d", "da", "dast")


def test_dast_configs_lists_every_packaged_config_and_each_loads(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(
        p.relative_to(PACKAGED_CONFIG_DIR).with_suffix("").as_posix()
        for p in PACKAGED_CONFIG_DIR.rglob("*.yaml")
        if "base" not in p.parts
    )
    # 24 paper rows, 4 additions (online self-training: *_online), demo, demo_timm
    assert packaged_config_names() == files and len(files) == 30
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in _table(lines)] == files
    # then the building blocks a config of your own extends, each named with its opening comment
    bases = lines[lines.index("building blocks for `extends:` in a config of your own (not runnable alone):") + 1 : -1]
    base_names = [n for n in packaged_config_names(include_base=True) if n.startswith("base/")]
    assert [b.split()[0] for b in bases] == base_names
    assert "base/common                 Settings shared by every paper config" in bases
    assert main(["configs", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in records] == files
    for r in records:
        cfg = load_config(r["name"])  # by name
        assert cfg == load_config(r["path"])  # and by file
        assert r["paper"] is not None and r["paper"]["row"]
        if not r["name"].startswith("demo") and not r["name"].endswith("source_only_online"):
            assert cfg.train.steps == 150000


def _table(lines: list[str]) -> list[str]:
    """The runnable configs' lines of `dast configs`: those before its 'use a name ...' line."""
    end = next(i for i, line in enumerate(lines) if line.startswith("use a name with --config"))
    return lines[:end]


def _readme_rows() -> dict[str, str]:
    """{config name: the paper's number(s) in the README's 'Reproduce the paper' tables}."""
    out: dict[str, str] = {}
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or "--config" not in cells[2]:
            continue
        for number, command in ((cells[1], cells[2]), (cells[3], cells[4])):
            m = re.search(r"--config (\S+)", command)
            assert m, command
            out[m.group(1)] = number
    return out


def test_paper_numbers_agree_with_the_readme_and_the_paper_tables() -> None:
    readme = _readme_rows()
    rows = [n for n in packaged_config_names() if not n.startswith("demo") and not n.endswith("_online")]
    assert sorted(readme) == rows  # the paper's rows; the *_online additions have no paper number
    for name, cell in readme.items():
        row = read_paper_row(name)
        assert row is not None
        if cell == "not reported":
            assert row.miou is None and row.miou_16 is None and row.miou_13 is None and row.tables == []
        elif name.startswith("gta5/"):
            assert row.miou == float(cell) and row.miou_16 is None and row.miou_13 is None
        else:
            m16, m13 = (c.strip() for c in cell.split("/"))
            assert row.miou_16 == (None if m16 == "–" else float(m16)) and row.miou_13 == float(m13)
    # spot checks against the paper itself (Tables 1-3)
    assert read_paper_row("gta5/resnet101/dast").miou == 49.6  # type: ignore[union-attr]
    assert read_paper_row("gta5/vgg16/mse_2d").tables == [3]  # type: ignore[union-attr]
    syn = read_paper_row("synthia/resnet101/source_only")
    assert syn is not None and (syn.miou_16, syn.miou_13, syn.tables) == (33.5, 38.6, [2])


def test_names_files_and_the_file_that_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = PACKAGED_CONFIG_DIR / "gta5" / "resnet101" / "dast.yaml"
    monkeypatch.chdir(tmp_path)
    for name in ("gta5/resnet101/dast", "gta5/resnet101/dast.yaml", "configs/gta5/resnet101/dast.yaml"):
        assert resolve_config_path(name).resolve() == want.resolve()
    assert resolve_config_path("demo").name == "demo.yaml"
    local = tmp_path / "gta5" / "resnet101" / "dast.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("extends: base/common\nsource: {kind: synthetic}\ntarget: {kind: synthetic, domain: target}\n")
    assert resolve_config_path("gta5/resnet101/dast.yaml") == Path("gta5/resnet101/dast.yaml")  # the file wins
    assert load_config("gta5/resnet101/dast.yaml").self_training.rounds == 0
    assert load_config("gta5/resnet101/dast").self_training.rounds == 3  # not a file: the packaged one
    with pytest.raises(ConfigError, match="no packaged config"):
        resolve_config_path("../../etc/passwd")


def test_an_unknown_name_is_one_line_with_close_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", "gta5/resnet101/dats", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: config file not found: gta5/resnet101/dats")
    assert "did you mean 'gta5/resnet101/dast'" in err[0]
    assert not (tmp_path / "run").exists()
    assert (
        main(
            [
                "pseudo-label",
                "--checkpoint",
                str(tmp_path / "x.safetensors"),
                "--config",
                "resnet101/dast",
                "--out",
                str(tmp_path / "pl"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "'gta5/resnet101/dast'" in err[0] and "'synthia/resnet101/dast'" in err[0]
    assert main(["sweep", "--configs", "nonsense_config", "--out", str(tmp_path / "s"), "--gpus", "cpu"]) == 2
    assert "`dast configs` lists the packaged configs" in capsys.readouterr().err


def test_sweep_takes_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "sweep",
                "--configs",
                "gta5/resnet101/da",
                "synthia/resnet101/da",
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "s"),
                "--gpus",
                "cpu",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert str(PACKAGED_CONFIG_DIR / "gta5" / "resnet101" / "da.yaml") in out
    assert "gta5_resnet101_da_seed0" in out and "synthia_resnet101_da_seed0" in out


def test_a_user_config_extends_a_packaged_one_by_name(tmp_path: Path) -> None:
    # what `dast init-config`'s comments suggest for a real run: the paper's schedule from base/common
    example = textwrap.dedent(
        """\
        extends: base/common
        model: {arch: resnet101, num_classes: 3, init: weights/resnet101_init.safetensors}
        source: {kind: folder, root: my_renders, size: [1280, 720]}
        target: {kind: folder, root: my_camera, labels: null, size: [1024, 512], with_labels: false}
        self_training: {rounds: 3, steps: 20000}
        """
    )
    (tmp_path / "mine.yaml").write_text(example)
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.train.steps == 150000 and cfg.model.num_classes == 3 and cfg.self_training.rounds == 3
    (tmp_path / "da_fast.yaml").write_text("extends: gta5/resnet101/da\ntrain: {steps: 10}\n")
    cfg = load_config(tmp_path / "da_fast.yaml")
    assert cfg.train.steps == 10 and cfg.adversarial.attention and cfg.source.kind == "gta5"


def test_paper_blocks_are_checked_and_not_inherited(tmp_path: Path) -> None:
    assert "paper" not in load_yaml_tree("gta5/resnet101/dast")
    da, dast = read_paper_row("gta5/resnet101/da"), read_paper_row("gta5/resnet101/dast")
    assert da is not None and dast is not None and (da.miou, dast.miou) == (44.8, 49.6)
    (tmp_path / "child.yaml").write_text("extends: gta5/resnet101/da\n")  # no block of its own
    assert read_paper_row(tmp_path / "child.yaml") is None
    (tmp_path / "bad.yaml").write_text("extends: demo\npaper: {row: x, mIoU: 3}\n")
    with pytest.raises(ConfigError, match="'paper.mIoU'"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("extends: demo\npaper: 41.4\n")
    with pytest.raises(ConfigError, match="'paper' must be a mapping"):
        load_config(tmp_path / "bad2.yaml")


def _copy_source(dst: Path) -> Path:
    """The files a wheel is built from, copied out of the checkout (a build writes build/ and
    *.egg-info next to pyproject.toml; the checkout stays untouched)."""
    dst.mkdir()
    shutil.copy2(REPO / "pyproject.toml", dst)
    shutil.copy2(REPO / "README.md", dst)
    shutil.copytree(REPO / "dast", dst / "dast", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_trains_outside_the_checkout(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv (dependencies borrowed from this
    interpreter through a .pth file, nothing downloaded) and run it from another folder."""
    # no PYTHONPATH anywhere: pip would otherwise see the checkout's own dast metadata and skip the install
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*cmd: str | Path, cwd: Path = tmp_path, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(
            [str(c) for c in cmd], cwd=cwd, env=env or clean, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        return proc.stdout

    src = _copy_source(tmp_path / "src")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        tmp_path / "wheels",
        src,
    )
    wheel = next((tmp_path / "wheels").glob("dast-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("dast/configs/") and n.endswith(".yaml")}
    want = {
        f"dast/configs/{p.relative_to(PACKAGED_CONFIG_DIR).as_posix()}" for p in PACKAGED_CONFIG_DIR.rglob("*.yaml")
    }
    assert shipped == want

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    # torch, numpy, ... come from this interpreter's site-packages (listed after the venv's own)
    (Path(purelib) / "_host_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = run(python, "-c", "import dast; print(dast.__file__)", cwd=work, env=env).strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(REPO)

    dast_cli = venv / "bin" / "dast"
    listed = run(dast_cli, "configs", cwd=work, env=env).splitlines()
    assert [line.split()[0] for line in _table(listed)] == packaged_config_names()
    small = [
        "train.steps=2",
        "self_training.rounds=0",
        "selection.enabled=false",
        "source.count=4",
        "target.count=4",
        "val.count=2",
        "source.size=[64,32]",
        "target.size=[64,32]",
        "val.size=[64,32]",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "train.eval_every=2",
        "train.image_every=2",
        "train.log_every=1",
    ]
    sets = [arg for s in small for arg in ("--set", s)]
    run(dast_cli, "train", "--config", "demo", "--out", "RUN", "--no-progress", *sets, cwd=work, env=env)
    assert (work / "RUN" / "final" / "model.safetensors").is_file()
