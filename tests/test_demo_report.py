"""`dast report DEMO_OUT`: the demo page (results, figures, run links) and each run's report."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dast.cli import main
from dast.demo.summary import summarize_seeds
from dast.models.io import ModelSpec, build_networks, save_networks

TINY_RUN_CONFIG = """
seed: 3
model: {arch: small, num_classes: 7, norm: unit}
source: {kind: synthetic, domain: source, count: 4, size: [32, 16]}
target: {kind: synthetic, domain: target, count: 4, size: [32, 16], with_labels: false}
val: {kind: synthetic, domain: target, count: 2, size: [32, 16]}
self_training: {rounds: 0}
runtime: {device: cpu}
"""


def _run_dir(folder: Path, miou: float | None) -> Path:
    """A run directory as `dast train` leaves it: config, manifest, scalars and, when finished
    (``miou`` given), final metrics and an (untrained) final model."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(TINY_RUN_CONFIG)
    status = {"status": "complete", "stages": {"stage1": {"status": "complete", "steps": 2}}}
    (folder / "manifest.json").write_text(json.dumps(status if miou is not None else {"stages": {}}))
    (folder / "scalars.jsonl").write_text('{"step": 1, "stage1/loss/seg": 2.0}\n{"step": 2, "stage1/loss/seg": 1.5}\n')
    if miou is not None:
        (folder / "final").mkdir()
        metrics = {"miou": miou, "per_class": {"road": miou, "sky": miou, "car": miou}, "num_images": 2}
        (folder / "final" / "metrics.json").write_text(json.dumps(metrics))
        torch.manual_seed(0)
        spec = ModelSpec(arch="small", num_classes=7, norm="unit", input_size=(32, 16))
        save_networks(folder / "final" / "model.safetensors", build_networks(spec))
    return folder


def _demo_folder(root: Path) -> dict:
    """A demo folder: report.json with a variant the page has never heard of, one figure,
    one figure that is missing, two run directories and a variant whose run is gone."""
    _run_dir(root / "runs" / "source_only", 21.5)
    _run_dir(root / "runs" / "dast", None)  # unfinished
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(root / "figure3.png")
    report = {
        "variants": {
            "source_only": {"miou": 21.5, "per_class": {"road": 30.0, "sky": 20.0, "car": 14.5}, "gap_recovered": 0.0},
            "da": {"miou": 25.25, "per_class": {"road": 35.0, "sky": 22.0, "car": 18.75}, "gap_recovered": 40.0},
            "mystery_method": {
                "miou": 27.0,
                "per_class": {"road": 36.0, "sky": 25.0, "car": 20.0, "bus": 1.0},
                "mechanism": "SA",
            },
        },
        "seed": 7,
        "seconds": 12.5,
        "quick": True,
        "figures": ["figure3.png", "miou_curve.png"],
        "runs": {
            "source_only": "runs/source_only/final/model.safetensors",
            "da": "runs/dast/stage1/selected.safetensors",
            "dast": "runs/dast/final/model.safetensors",
            "mystery_method": "runs/mystery/final/model.safetensors",
        },
        "train_seconds": {"source_only": 3.5, "dast": 8.25},
        "pseudo_labels": {
            "precision": 72.7,
            "labelled_fraction": 72.0,
            "per_class_precision": {"road": 70.0, "sky": 55.0, "car": None},
        },
        "mechanisms": {"mystery_method": ["self-training", "attention"]},
    }
    (root / "report.json").write_text(json.dumps(report))
    return report


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r'<section id="([^"]+)">', page)
    return {parts[i]: parts[i + 1].split("</section>")[0] for i in range(1, len(parts), 2)}


def test_report_of_a_demo_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo = tmp_path / "demo"
    report = _demo_folder(demo)
    assert main(["report", str(demo), "--device", "cpu", "--samples", "1"]) == 0
    printed = capsys.readouterr().out
    page = (demo / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert f"wrote {demo / 'report.html'}" in printed
    sec = _sections(page)
    assert {"results", "mechanisms", "pseudo-labels", "figures", "runs", "raw"} <= set(sec)

    # results: one row per variant in the report's order, unknown ones included, every class column
    rows = re.findall(r"<tr><td class=l>([^<]+)</td>", sec["results"])
    assert rows == ["source_only", "da", "mystery_method"]
    assert "<b>25.2</b>" in sec["results"] or "<b>25.3</b>" in sec["results"]  # 25.25 at one decimal
    for col in ("road", "sky", "car", "bus", "mechanism"):
        assert f"<th>{col}</th>" in sec["results"]
    assert "40%" in sec["results"] and ">SA<" in sec["results"]
    assert "72.7" in sec["pseudo-labels"] and "<th>car</th>" in sec["pseudo-labels"]
    assert "self-training" in sec["mechanisms"]

    # figures: the PNG itself embedded, the missing one named
    png = base64.b64encode((demo / "figure3.png").read_bytes()).decode()
    assert f"data:image/png;base64,{png}" in sec["figures"]
    assert "miou_curve.png is missing" in sec["figures"]

    # runs: each run directory got its own report, linked relative to the page
    for name in ("source_only", "dast"):
        run_page = demo / "runs" / name / "report.html"
        assert run_page.is_file() and "DAST run report" in run_page.read_text(encoding="utf-8")
        assert (
            "The first 1 images of the val set" if name == "source_only" else "No model to predict with"
        ) in run_page.read_text(encoding="utf-8")
        assert f'<a href="runs/{name}/report.html">' in sec["runs"]
        assert f"wrote {run_page.resolve()}" in printed
    cells = (re.findall(r"<td class=l>([^<]*)</td>", tr) for tr in sec["runs"].split("<tr>"))
    runs_rows = {r[0]: r for r in cells if r}
    assert runs_rows["runs/dast"][1] == "da, dast" and runs_rows["runs/dast"][2] == "not finished"
    assert runs_rows["runs/source_only"][2] == "complete" and "21.5" in sec["runs"] and "8.2" in sec["runs"]
    assert "no run directory holds runs/mystery/final/model.safetensors" in sec["runs"]
    assert "skipped runs/mystery/final/model.safetensors" in printed
    # report.json is linked, not inlined
    assert '<a href="report.json">report.json</a>' in sec["raw"] and "<pre>" not in page
    assert json.loads((demo / "report.json").read_text()) == report


def test_demo_page_elsewhere_links_back(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    _demo_folder(demo)
    out = tmp_path / "pages" / "demo.html"
    assert main(["report", str(demo), "--out", str(out), "--samples", "0"]) == 0
    page = out.read_text(encoding="utf-8")
    links = [link for link in re.findall(r'<a href="([^"]+)">', page) if not link.startswith("#")]
    assert links == ["../demo/runs/source_only/report.html", "../demo/runs/dast/report.html", "../demo/report.json"]
    assert all((out.parent / link).is_file() for link in links)
    assert not (demo / "report.html").exists()


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("{not json", "cannot be read as JSON"),
        ('{"seed": 1}', "has no 'variants' mapping"),
    ],
)
def test_a_broken_report_json_is_one_error_line(
    content: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "report.json").write_text(content)
    assert main(["report", str(demo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err and str(demo) in err
    assert not (demo / "report.html").exists()


def _seed_report(seed: int, base: float, bn: float, da: float) -> dict:
    def variant(miou: float) -> dict:
        return {"miou": miou, "per_class": {"road": miou}, "last": {"miou": miou + 1.0}}

    return {
        "seed": seed,
        "variants": {"source_only_bn": variant(bn), "baseline": variant(base), "da": variant(da)},
        "figures": [],
    }


def test_report_of_a_several_seed_demo_links_every_seed_page(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    reports = [_seed_report(0, 40.0, 30.0, 44.0), _seed_report(1, 42.0, 34.0, 40.0)]
    for r in reports:
        (demo / f"seed{r['seed']}").mkdir(parents=True)
        (demo / f"seed{r['seed']}" / "report.json").write_text(json.dumps(r))
    _run_dir(demo / "seed1" / "runs" / "baseline", 42.0)
    summary = summarize_seeds(reports)
    top = {
        "variants": {m: {"miou": e["mean"], "std": e["std"]} for m, e in summary["methods"].items()},
        "seeds": [0, 1, 2],
        "summary": summary,
        "per_seed": {
            "0": "seed0/report.json",
            "1": "seed1/report.json",
            "2": "seed2/report.json",  # missing
            "3": "seed3/report.json",  # truncated
            "4": "report.json",  # the demo folder itself: no recursion
            "5": "../elsewhere/report.json",  # outside the demo folder
        },
        "figures": [],
    }
    (demo / "report.json").write_text(json.dumps(top))
    (demo / "seed3").mkdir()
    (demo / "seed3" / "report.json").write_text('{"variants": {')
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "report.json").write_text(json.dumps(reports[0]))
    assert main(["report", str(demo), "--device", "cpu", "--samples", "0"]) == 0

    sec = _sections((demo / "report.html").read_text(encoding="utf-8"))
    seeds = sec["seeds"]
    rows = re.findall(r"<tr>(.*?)</tr>", seeds)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    assert [c[0] for c in cells] == ["source_only_bn", "baseline", "da"]
    # da: mean 42.0, std of (44, 40) = 2.83; last step 43.0; per seed 44.0, 40.0;
    # vs baseline: (+4, -2) -> +1.0, higher on 1 of 2; vs source_only_bn: (+14, +6) -> +10.0, 2 of 2
    assert cells[2][1:] == ["42.0 &plusmn; 2.83", "43.0 &plusmn; 2.83", "44.0", "40.0", "+1.0 (1/2)", "+10.0 (2/2)"]
    assert 'href="seed0/report.html"' in seeds and 'href="seed1/report.html"' in seeds
    assert "seed2/ holds no demo report" in seeds
    assert "seed 3: no page: " in seeds and "cannot be read as JSON" in seeds
    assert "seed 4: ./ is not a seed folder inside the demo folder" in seeds
    assert "seed 5: ../elsewhere/ is not a seed folder inside the demo folder" in seeds
    assert not (tmp_path / "elsewhere" / "report.html").exists()
    assert 'href="#seeds"' in (demo / "report.html").read_text(encoding="utf-8")
    assert (demo / "seed0" / "report.html").is_file() and (demo / "seed1" / "report.html").is_file()
    assert (demo / "seed1" / "runs" / "baseline" / "report.html").is_file()  # a seed's runs get their reports
    assert "No run directories" not in sec["runs"] and "each seed's page links them" in sec["runs"]
