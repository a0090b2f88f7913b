"""The report's numbers and tables: 3 significant digits, the demo's mechanisms as tables,
the snapshot each figure comes from, and `dast report RUNS_DIR` over every run below a folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_demo_report import TINY_RUN_CONFIG

from dast.cli import main
from dast.reporting.page import sig

RUN_CONFIG = TINY_RUN_CONFIG.replace("self_training: {rounds: 0}", "self_training: {rounds: 1}")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.5494708619652899, "0.549"),
        (0.6050, "0.605"),
        (0.58299, "0.583"),
        (58.30462150180943, "58.3"),
        (9.78145304193739, "9.78"),
        (99.96, "100"),
        (0.09996, "0.100"),
        (1234.56, "1235"),
        (-0.7262, "-0.726"),
        (0.0, "0"),
        (110592, "110592"),
        (None, "&ndash;"),
        (True, "&ndash;"),
    ],
)
def test_three_significant_digits(value: object, text: str) -> None:
    assert sig(value) == text


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r'<section id="([^"]+)">', page)
    return {parts[i]: parts[i + 1].split("</section>")[0] for i in range(1, len(parts), 2)}


def _rows(html: str) -> list[list[str]]:
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", html)]


def test_the_demo_page_keeps_the_mechanisms_comparison(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    demo.mkdir()
    report = {
        "variants": {
            "da": {
                "miou": 40.04,
                "per_class": {"road": 43.1, "car": 30.6},
                "snapshot": "stage1 step 60",
                "selection_score": 33.71,
                "last": {"miou": 37.33, "snapshot": "stage1 step 120"},
            },
            "oracle": {
                "miou": 58.30462150180943,
                "per_class": {"road": 67.0, "car": 49.5},
                "snapshot": "stage1 step 120",
                "selection_score": None,
                "last": {"miou": 58.30462150180943},
            },
        },
        "seed": 0,
        "figures": [],
        "mechanisms": {
            "attention": {
                "auroc": 0.5494708619652899,
                "pixels": 110592,
                "source_only_error_rate": 0.4247775607638889,
                "mean_attention_on_errors": 0.6050183258056641,
                "mean_attention_on_correct": 0.5829977060508728,
            },
            "discriminators": {
                "D": {"source": 0.23181724548339844, "target": 0.9580671787261963, "gap": 0.7262499332427979},
                "C": {"source": 0.3314340114593506, "target": 0.8997295498847961, "gap": 0.5682955384254456},
            },
            "pseudo_labels": {
                "portion": 0.5,
                "thresholds": [0.8999999761581421, 0.6907501220703125],
                "rules": {
                    "ratio": {"precision": 74.32, "per_class_precision": {"road": 63.42, "car": 79.7}},
                    "threshold": {"precision": 74.31, "per_class_precision": {"road": 63.41, "car": 79.7}},
                },
            },
        },
    }
    (demo / "report.json").write_text(json.dumps(report))
    assert main(["report", str(demo), "--samples", "0"]) == 0
    page = (demo / "report.html").read_text(encoding="utf-8")
    sec = _sections(page)
    assert '<a href="#mechanisms">Mechanisms</a>' in page
    mech = sec["mechanisms"]
    rows = {r[0]: r[1:] for r in _rows(mech)}
    assert rows["AUROC of alpha on the pixels source-only gets wrong (0.5 = chance)"] == ["0.549"]
    assert rows["mean alpha on those pixels"] == ["0.605"] and rows["mean alpha on the other pixels"] == ["0.583"]
    assert rows["D"] == ["0.232", "0.958", "0.726"] and rows["C"] == ["0.331", "0.900", "0.568"]
    # the rules, a row each: their precision, then their per-class precision
    assert "<tr><td class=l>ratio</td><td>74.3</td></tr><tr><td class=l>threshold</td><td>74.3</td></tr>" in mech
    assert rows["ratio"] == ["63.4", "79.7"] and rows["threshold"] == ["63.4", "79.7"]
    assert "<p>0.900, 0.691</p>" in mech  # the thresholds, one line
    assert "{" not in mech and "0.54947" not in page  # no JSON, no 16-digit floats anywhere
    # the results: the reported snapshot, the last step and the selection score, each labelled
    results = _rows(sec["results"])
    assert results[0][:5] == [
        "variant",
        "<b>mIoU</b> (reported snapshot)",
        "snapshot",
        "mIoU at the last step",
        "gap recovered",
    ]
    assert results[1][:4] == ["da", "<b>40.0</b>", "stage1 step 60", "37.3"]
    assert results[2][:4] == ["oracle", "<b>58.3</b>", "stage1 step 120", "58.3"]
    assert "selection score" in results[0]
    assert "the oracle at its last step" in sec["results"]


def _run(folder: Path, miou: float | None, per_class: dict[str, float] | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(RUN_CONFIG)
    if miou is not None:
        (folder / "final").mkdir()
        metrics = {"miou": miou, "per_class": per_class or {"road": miou}, "num_images": 2}
        (folder / "final" / "metrics.json").write_text(json.dumps(metrics))
        (folder / "manifest.json").write_text(json.dumps({"status": "complete", "stages": {}}))


def test_dast_report_on_a_folder_of_runs_writes_one_comparison_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    _run(runs / "sweep" / "da_seed0", 44.81234, {"road": 50.0, "car": 39.62468})
    _run(runs / "sweep" / "dast_seed0", 49.6, {"road": 55.0, "sky": 44.2})
    _run(runs / "mine", None)  # not finished
    (runs / "notes").mkdir()  # not a run directory: skipped
    assert main(["report", str(runs), "--samples", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"wrote {runs / 'report.html'}"
    assert sorted(printed[:-1]) == sorted(
        f"wrote {runs / name / 'report.html'}" for name in ("mine", "sweep/da_seed0", "sweep/dast_seed0")
    )
    page = (runs / "report.html").read_text(encoding="utf-8")
    table = _rows(_sections(page)["runs"])
    assert table[0] == ["run", "status", "method", "stage-1 steps", "rounds", "<b>final mIoU</b>", "road", "car", "sky"]
    names = [re.sub(r"<[^>]+>", "", r[0]) for r in table[1:]]
    assert names == ["mine", "sweep/da_seed0", "sweep/dast_seed0"]
    assert table[1][1] == "not finished" and table[1][5] == "<b>&ndash;</b>"
    assert table[2][1:] == [
        "not finished",  # no final model file in this fixture
        "small, paper, synthetic -&gt; synthetic, attention",
        "150000",
        "1 x 20000",
        "<b>44.8</b>",
        "50.0",
        "39.6",
        "&ndash;",
    ]
    assert table[3][5:] == ["<b>49.6</b>", "55.0", "&ndash;", "44.2"]
    assert '<a href="sweep/da_seed0/report.html">sweep/da_seed0</a>' in page


def test_a_folder_without_run_directories_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'empty'} is not a dast run directory") and "nor are there run" in err
