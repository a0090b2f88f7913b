"""``dast bench``: JSON rows per measurement, argument errors, timing rules."""

from __future__ import annotations

import json

import pytest
import torch

from dast.benchmarking import SIZES, BenchRequest, Sizes, parse_modes, run_benchmarks, workloads
from dast.benchmarking.timing import measure
from dast.cli import main
from dast.errors import UserError
from dast.training.levers import device_capabilities

REQUIRED = {"what", "arch", "mode", "device", "torch", "ms_median", "ms_min", "ms_max", "iters", "peak_mem_gib"}


@pytest.fixture()
def tiny_size(monkeypatch):
    monkeypatch.setitem(SIZES, "tiny", Sizes((96, 64), (80, 64), (160, 128)))
    return "tiny"


def test_cli_small_step_prints_one_json_row_per_mode(capsys, tmp_path) -> None:
    out = tmp_path / "bench.jsonl"
    code = main(
        [
            "bench",
            "--device",
            "cpu",
            "--size",
            "small",
            "--what",
            "step",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--modes",
            "fast,eager-fp32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["mode"] for r in rows] == ["eager-fp32", "fast"]  # baseline first
    for r in rows:
        assert REQUIRED <= set(r)
        assert r["what"] == "step" and r["arch"] == "small" and r["device"] == "cpu"
        assert r["source_size"] == [256, 144] and r["target_size"] == [256, 128]
        assert r["iters"] == 1 and r["peak_mem_gib"] is None and r["applied_fraction"] == 1.0
        assert r["ms_min"] <= r["ms_median"] <= r["ms_max"]
    assert rows[0]["amp"] == "none" and rows[0]["optimizers"] == "released" and not rows[0]["reuse_discoverer"]
    native = device_capabilities("cpu").native_bf16  # bf16 only where this CPU computes it natively
    assert rows[1]["amp"] == ("bf16" if native else "none")
    assert rows[1]["optimizers"] == "foreach" and rows[1]["reuse_discoverer"]
    assert rows[1]["speedup_vs_eager_fp32"] == pytest.approx(rows[0]["ms_median"] / rows[1]["ms_median"], rel=1e-2)
    assert out.read_text().splitlines() == lines


@pytest.mark.parametrize("interleave", [False, True])
def test_every_workload_runs_at_a_tiny_size(tiny_size, interleave) -> None:
    rows = list(
        run_benchmarks(
            BenchRequest(
                device=torch.device("cpu"),
                archs=["small"],
                size=tiny_size,
                whats=["step2", "step_online", "infer", "pseudo"],
                modes=["eager-fp32", "fast"],
                iters=2,
                warmup=1,
                batches=[1, 2],
                num_classes=5,
                interleave=interleave,
            )
        )
    )
    assert [(r["what"], r["batch"], r["mode"]) for r in rows] == [
        ("step2", 1, "eager-fp32"),
        ("step2", 1, "fast"),
        ("step_online", 1, "eager-fp32"),
        ("step_online", 1, "fast"),
        ("infer", 1, "eager-fp32"),
        ("infer", 1, "fast"),
        ("infer", 2, "eager-fp32"),
        ("infer", 2, "fast"),
        ("pseudo", 1, "eager-fp32"),
        ("pseudo", 1, "fast"),
        ("pseudo", 2, "eager-fp32"),
        ("pseudo", 2, "fast"),
    ]
    for r in rows:
        assert "error" not in r, r
        assert REQUIRED <= set(r) and r["iters"] == 2 and r["interleaved"] is interleave
    infer = [r for r in rows if r["what"] == "infer"]
    for r in infer:
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_median"], rel=1e-2)
        assert r["output_size"] == [160, 128]
    assert all(r["forward_passes_per_image"] == 2 for r in rows if r["what"] == "pseudo")


@pytest.mark.parametrize("interleave", [False, True])
def test_a_failing_measurement_yields_an_error_row_and_the_rest_still_run(tiny_size, monkeypatch, interleave) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(workloads, "prepare_infer", broken)
    rows = list(
        run_benchmarks(
            BenchRequest(
                device=torch.device("cpu"),
                archs=["small"],
                size=tiny_size,
                whats=["infer", "pseudo"],
                modes=["eager-fp32"],
                iters=1,
                warmup=0,
                batches=[1],
                num_classes=3,
                interleave=interleave,
            )
        )
    )
    assert rows[0]["error"] == "RuntimeError: out of memory" and "ms_median" not in rows[0]
    assert "error" not in rows[1] and rows[1]["what"] == "pseudo"


def test_measure_runs_warmup_then_timed_iterations() -> None:
    calls: list[int] = []
    t = measure(calls.append, iters=5, warmup=2, device=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4, 5, 6]
    assert len(t.times_ms) == 5 and t.summary()["iters"] == 5
    with pytest.raises(ValueError):
        measure(calls.append, iters=0, warmup=0, device=torch.device("cpu"))


def test_parse_modes_checks_names_and_puts_the_baseline_first() -> None:
    assert parse_modes("fast, eager-fp32,fast") == ["eager-fp32", "fast"]
    with pytest.raises(UserError, match="unknown mode 'turbo'"):
        parse_modes("eager-fp32,turbo")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "nope"], "unknown mode 'nope'"),
        (["--what", "step,train"], "unknown value 'train' in --what"),
        (["--arch", "resnet50"], "unknown value 'resnet50' in --arch"),
        (["--batches", "1,x"], "--batches takes positive whole numbers"),
    ],
)
def test_bad_arguments_are_user_errors(argv, message, capsys) -> None:
    assert main(["bench", "--device", "cpu", "--size", "small", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_a_gpu_is_a_user_error(capsys) -> None:
    assert main(["bench", "--device", "cuda", "--size", "small"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
