"""`dast report`: one self-contained HTML page for a finished or unfinished run directory."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dast.cli import main
from dast.config import load_config, to_yaml
from dast.reporting.figures import bin_means, split_scalars
from dast.reporting.rundir import read_scalars
from dast.reporting.samples import pixel_accuracy

IMG = re.compile(r"<img\b[^>]*>")
PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r'<section id="([^"]+)">', page)
    return {parts[i]: parts[i + 1].split("</section>")[0] for i in range(1, len(parts), 2)}


def _pngs(fragment: str) -> list[Image.Image]:
    """Every <img> of ``fragment``, decoded; fails unless each is an embedded, valid PNG."""
    out = []
    for tag in IMG.findall(fragment):
        m = PNG_URI.search(tag)
        assert m, f"image not embedded as a PNG data URI: {tag[:80]}"
        data = base64.b64decode(m.group(1), validate=True)
        assert data
        Image.open(io.BytesIO(data)).verify()
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.format == "PNG" and img.width > 0 and img.height > 0
        out.append(img)
    return out


def _self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for needle in ("<script", "<link", 'src="http', "src='http", "url("):
        assert needle not in page


def test_report_of_a_finished_and_an_unfinished_run(tiny_config, tmp_path: Path, capsys) -> None:
    cfg = tiny_config(
        train={"steps": 2}, self_training={"rounds": 1, "steps": 1, "preview_count": 2}, selection={"num_images": 2}
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "--samples", "2", "--device", "cpu"]) == 0
    assert f"wrote {run / 'report.html'}" in capsys.readouterr().out
    page = (run / "report.html").read_text(encoding="utf-8")
    _self_contained(page)
    sec = _sections(page)
    assert set(sec) == {"status", "metrics", "curves", "training", "samples", "pseudo-labels", "config", "log"}

    # every image on the page is an embedded PNG, and each figure section has its images
    assert len(_pngs(page)) == len(IMG.findall(page))
    assert len(_pngs(sec["curves"])) == 1
    assert len(_pngs(sec["training"])) == 3  # losses, learning rates, discriminator outputs
    samples = _pngs(sec["samples"])
    assert len(samples) == 2 * 4  # input | attention | prediction | ground truth, per image
    assert all(s.size == (64, 32) for s in samples)
    previews = sorted((run / "round1" / "pseudo_labels" / "preview").glob("*.png"))
    assert len(previews) == 2 and len(_pngs(sec["pseudo-labels"])) == 2
    for p in previews:
        assert base64.b64encode(p.read_bytes()).decode() in sec["pseudo-labels"]  # the files themselves

    # per-class table in the table's order, with the mIoU of metrics.json
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    positions = [sec["metrics"].index(f"<th>{name}</th>") for name in metrics["per_class"]]
    assert positions == sorted(positions) and len(positions) == 7
    assert f"<b>{metrics['miou']:.1f}</b>" in sec["metrics"]

    # run status: every stage and its selected step; pseudo-label stats of the round
    for stage in ("stage1", "round1", "final"):
        assert f"<td class=l>{stage}</td>" in sec["status"]
    assert "not finished" not in page and "The run is <b>complete</b>" in page
    stats = json.loads((run / "round1" / "pseudo_labels" / "stats.json").read_text())
    assert f"portion {stats['portion']:.2f}" in sec["pseudo-labels"]
    assert f"ignored fraction {100 * stats['ignored_fraction']:.1f}%" in sec["pseudo-labels"]
    assert f"{stats['thresholds'][0]:.4f}" in sec["pseudo-labels"]
    assert "variant: paper" in sec["config"]

    # the same run with its last stage still running and no final/
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    shutil.rmtree(unfinished / "final")
    (unfinished / "report.html").unlink()
    (unfinished / "round1" / "selected.safetensors").unlink()
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest.pop("status"), manifest.pop("final")
    manifest["stages"]["round1"] = {"status": "running", "steps": 1}
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "elsewhere" / "u.html"
    assert main(["report", str(unfinished), "--out", str(out), "--samples", "1", "--device", "cpu"]) == 0
    page = out.read_text(encoding="utf-8")
    _self_contained(page)
    sec = _sections(page)
    assert "This run is not finished" in page and "round1 is running" in page
    assert "no final model (final/model.safetensors)" in page
    assert "No final metrics yet" in sec["metrics"] and "<table" not in sec["metrics"]
    assert "the selected model of stage1" in page  # round1 selected nothing yet
    assert len(_pngs(sec["samples"])) == 4
    assert not (unfinished / "report.html").exists()


def test_report_of_a_run_that_has_only_started(tiny_config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config(tiny_config(self_training={"rounds": 2}))))
    (run / "manifest.json").write_text(json.dumps({"stages": {"stage1": {"status": "running", "steps": 4}}}))
    (run / "scalars.jsonl").write_text('{"step": 1, "stage1/loss/seg": 2.0}\n{"step": 1, "stage1/loss/seg": 1.5}\n{"st')
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    sec = _sections(page)
    assert "This run is not finished" in page
    for stage in ("stage1", "round1", "round2"):
        assert f"<td class=l>{stage}</td>" in sec["status"]
    assert sec["status"].count("not started") == 3  # round1, round2, final
    assert "No model to predict with yet" in sec["samples"]
    assert "No evaluations yet" in sec["curves"]
    assert len(_pngs(sec["training"])) == 1  # the one loss
    assert "no pseudo labels yet" in sec["pseudo-labels"]
    assert not IMG.findall(sec["pseudo-labels"])


@pytest.mark.parametrize("kind", ["empty", "missing", "file", "foreign_config"])
def test_report_refuses_a_directory_that_is_not_a_run(kind: str, tmp_path: Path, capsys) -> None:
    target = tmp_path / "x"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("hello")
    elif kind == "foreign_config":
        target.mkdir()
        (target / "config.yaml").write_text("lr: 0.1\nepochs: 3\n")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(target) in err
    assert not (tmp_path / "x" / "report.html").exists()


def test_report_refuses_a_negative_sample_count(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path), "--samples", "-1"]) == 2
    assert "--samples" in capsys.readouterr().err


def test_scalars_keep_the_last_value_of_a_repeated_step(tmp_path: Path) -> None:
    p = tmp_path / "scalars.jsonl"
    p.write_text(
        "\n".join(
            [
                '{"step": 1, "stage1/loss/seg": 3.0, "stage1/lr/segmentor": 0.01}',
                '{"step": 2, "stage1/loss/seg": 2.0}',
                '{"step": 2, "eval/target": 10.0}',
                '{"step": 2, "stage1/loss/seg": 1.0}',  # the resumed run logged step 2 again
                '{"step": 3, "round1/out/d_target": 0.5, "note": "text"}',
                '{"step": 4, "stage1/lo',  # torn last line of a killed run
            ]
        )
    )
    scalars = read_scalars(p)
    assert scalars == {
        "stage1/loss/seg": {1: 3.0, 2: 1.0},
        "stage1/lr/segmentor": {1: 0.01},
        "eval/target": {2: 10.0},
        "round1/out/d_target": {3: 0.5},
    }
    assert split_scalars(scalars) == {
        "loss": {"seg": {"stage1": [(1, 3.0), (2, 1.0)]}},
        "lr": {"segmentor": {"stage1": [(1, 0.01)]}},
        "other": {"out/d_target": {"round1": [(3, 0.5)]}},
    }


def test_bin_means_and_pixel_accuracy() -> None:
    x, y, k = bin_means([(1, 1.0), (2, 3.0), (3, 5.0), (4, float("nan")), (5, 4.0)], limit=2)
    assert k == 3 and x.tolist() == [2.0, 4.5] and y.tolist() == [3.0, 4.0]
    x, y, k = bin_means([(1, 1.0), (2, 2.0)], limit=2)
    assert k == 1 and y.tolist() == [1.0, 2.0]
    pred = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    gt = np.array([[0, 2], [2, 255]], dtype=np.uint8)
    assert pixel_accuracy(pred, gt) == pytest.approx(200.0 / 3)
    assert pixel_accuracy(pred, np.full((2, 2), 255, np.uint8)) is None
