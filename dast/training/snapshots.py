"""The best and selected snapshots of a stage.

While a stage runs, each new best evaluation writes ``best_step_<step>.safetensors``. A
best snapshot outlives the checkpoints that came before it: an older one is deleted only
once a checkpoint records the newer one as the best (:func:`prune_best_files` after each
save), and one newer than the checkpoint a stage restores (after a rollback, or a kill
between an evaluation and the next checkpoint) is deleted on restore. So the file of the
best step of the restored history always exists. When the stage ends, the best snapshot
becomes ``best.safetensors`` and the selected model ``selected.safetensors``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dast.checkpoint import load_checkpoint, read_meta, save_checkpoint
from dast.models.io import Networks, save_networks
from dast.rundir import RunDir, StageDir


def prune_best_files(stage: StageDir, best: dict[str, Any] | None) -> None:
    """Delete the per-step best snapshots other than that of ``best`` (all if None)."""
    keep = None if best is None else int(best["step"])
    for step, p in stage.best_step_files():
        if step != keep:
            p.unlink(missing_ok=True)


def find_best_file(stage: StageDir, best: dict[str, Any] | None) -> Path | None:
    """The snapshot of ``best``'s step: its per-step file, or a finished stage's
    ``best.safetensors`` if that records the same step; None if neither exists."""
    if best is None:
        return None
    per_step = stage.best_step(int(best["step"]))
    if per_step.exists():
        return per_step
    if stage.best.exists() and read_meta(stage.best).get("step") == best["step"]:
        return stage.best
    return None


def save_best(stage: StageDir, nets: Networks, stage_name: str, best: dict[str, Any]) -> None:
    """Write the snapshot of a new best evaluation."""
    save_networks(
        stage.best_step(int(best["step"])),
        nets,
        extra_meta={"stage": stage_name, "step": best["step"], "selection": best},
    )


def write_selected(
    stage: StageDir,
    nets: Networks,
    stage_name: str,
    steps: int,
    best: dict[str, Any] | None,
    select_on: str,
    log: logging.Logger,
) -> None:
    """``selected.safetensors``: the best snapshot by the selection score, or the last step
    (``select_on: last``, no evaluation, or a best snapshot that is not on disk)."""
    best_path = find_best_file(stage, best)
    if best is not None and best_path is not None and select_on != "last":
        tensors, _ = load_checkpoint(best_path)
        save_checkpoint(
            stage.selected,
            tensors,
            {
                "kind": "model",
                "model": nets.spec.to_dict(),
                "stage": stage_name,
                "step": best["step"],
                "selection": best,
            },
        )
        log.info("%s: selected step %d (%s = %.2f)", stage_name, best["step"], best["key"], best["value"])
        if best_path != stage.best:
            best_path.replace(stage.best)
        prune_best_files(stage, None)
        return
    if best is not None and select_on != "last":
        log.warning("%s: the best snapshot (step %d) is not on disk; selecting the last step", stage_name, best["step"])
    save_networks(stage.selected, nets, extra_meta={"stage": stage_name, "step": steps, "selection": None})
    log.info("%s: selected the last step (%d)", stage_name, steps)


def best_across_stages(run: RunDir) -> tuple[Path, str, float] | None:
    """(path, stage, score) of the selected snapshot with the best selection score over all
    stages of ``run`` (the earliest stage wins a tie); None when no stage recorded a score."""
    best: tuple[Path, str, float] | None = None
    for name in run.stage_names():
        path = run.stage(name).selected
        sel = read_meta(path).get("selection") if path.exists() else None
        if sel and sel.get("value") is not None and (best is None or float(sel["value"]) > best[2]):
            best = (path, name, float(sel["value"]))
    return best
