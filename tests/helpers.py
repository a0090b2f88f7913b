"""Test helpers for the step functions: settings from the config, a context, a batch."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file

from dast.config import Config, DatasetConfig, resolve
from dast.training.plans import StagePlan, stage_plans, step_settings
from dast.training.step import Autocast, StepContext, StepModels, StepSettings


def settings(*, weight_corrector: bool | None = None, **overrides: Any) -> StepSettings:
    """The step settings of the default ``reference`` config's stage 1 (no attention
    weighting), with ``overrides``; ``weight_corrector`` sets both weighting flags."""
    cfg = resolve(
        Config(variant="reference", source=DatasetConfig(kind="synthetic"), target=DatasetConfig(kind="synthetic"))
    )
    base = step_settings(cfg, stage_plans(cfg, 1)[0])
    if weight_corrector is not None:
        overrides = {"weight_segmentor_adv": weight_corrector, "weight_corrector_adv": weight_corrector, **overrides}
    return dataclasses.replace(base, **overrides)


def context(
    models: StepModels,
    seg_opt: torch.optim.Optimizer,
    disc_opt: torch.optim.Optimizer | None,
    step_settings_: StepSettings | None = None,
    autocast: Autocast = contextlib.nullcontext,
) -> StepContext:
    """A :class:`StepContext` (default settings: :func:`settings`)."""
    return StepContext(models, seg_opt, disc_opt, step_settings_ or settings(), autocast)


def plan(name: str = "stage1", index: int = 0, steps: int = 10, **overrides: Any) -> StagePlan:
    """A stage plan for tests: poly over 100 steps at lr 0.01 (10x on the head), no
    duplicated parameters, adversarial; round ``index`` > 0 trains on pseudo labels."""
    fields: dict[str, Any] = {
        "name": name,
        "kind": "adversarial" if index == 0 else "round",
        "index": index,
        "steps": steps,
        "poly_steps": 100,
        "lr": 0.01,
        "head_lr_mult": 10.0,
        "duplicate_params": False,
        "adversarial": True,
        "mu": 1.0,
        "pseudo_labels": index > 0,
        "global_offset": 0,
        "lr_mult": 1.0,
        "batchnorm": "train",
        "eval_every": 1000,
    }
    return StagePlan(**{**fields, **overrides})


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a finished run's final model."""
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit for bit, tensor by tensor."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def benchmark_module(name: str) -> ModuleType:
    """A script of ``benchmarks/`` imported as a module (its functions are tested directly)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
