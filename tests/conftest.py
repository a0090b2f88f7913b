"""Shared fixtures: tiny configs on the synthetic domains."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from dast.config import deep_merge

# Tiny networks run fastest on one thread, and subprocesses (torchrun, kill tests) must
# not oversubscribe the CI machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one intra-op thread, whatever an earlier test set."""
    torch.set_num_threads(1)
    yield


TINY = {
    "seed": 3,
    "variant": "paper",
    "model": {"arch": "small", "num_classes": 7, "norm": "unit"},
    "source": {"kind": "synthetic", "domain": "source", "count": 8, "size": [64, 32]},
    "target": {"kind": "synthetic", "domain": "target", "count": 8, "size": [64, 32], "with_labels": False},
    "val": {"kind": "synthetic", "domain": "target", "count": 3, "size": [64, 32]},
    "train": {
        "steps": 4,
        "poly_steps": 100,
        "lr": 0.01,
        "batch_size": 2,
        "num_workers": 0,
        "checkpoint_every": 2,
        "keep_last": 2,
        "eval_every": 2,
        "image_every": 2,
        "log_every": 1,
    },
    "self_training": {"rounds": 0, "steps": 2, "poly_steps": 100, "preview_count": 2},
    "selection": {"enabled": True, "num_images": 3, "betas": [0.5, 0.9]},
    "runtime": {"device": "cpu"},
}


@pytest.fixture()
def tiny_config(tmp_path: Path):
    """Write a tiny synthetic-domain config; returns a function taking overrides."""

    def make(name: str = "tiny.yaml", **sections) -> Path:
        tree = deep_merge(copy.deepcopy(TINY), sections)
        p = tmp_path / name
        p.write_text(yaml.safe_dump(tree))
        return p

    return make
