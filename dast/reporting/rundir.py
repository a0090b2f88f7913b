"""Reading a run directory written by ``dast train`` for the report.

Everything here only reads. A file that is missing or damaged becomes a note in
:attr:`RunContents.notes` (the report says so) rather than an error; only a directory that
is not a run directory at all is a :class:`UserError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dast.checkpoint import read_meta
from dast.config import Config, from_tree
from dast.data.labels import table_for
from dast.errors import UserError
from dast.rundir import (
    ONLINE,
    PL_COMPLETE,
    PL_PREVIEW,
    PL_STATS,
    STAGE1,
    RunDir,
    StageDir,
    round_name,
    stage_sort_key,
)

PREVIEW_LIMIT = 12
LOG_TAIL_LINES = 40


@dataclass
class StageInfo:
    """One training stage (``stage1`` or ``round<k>``) as the run directory shows it."""

    name: str
    status: str  # complete | running | started | not started
    steps: int | None = None
    selected_step: int | None = None
    selected_value: float | None = None
    selected_key: str | None = None
    latest_checkpoint: int | None = None


@dataclass
class RoundLabels:
    """The pseudo labels of one self-training round."""

    name: str
    folder: Path
    exists: bool
    complete: bool
    stats: dict[str, Any] | None = None
    previews: list[tuple[str, bytes]] = field(default_factory=list)
    note: str | None = None


@dataclass
class RunContents:
    """Everything the report shows, read from a run directory."""

    root: Path
    config_text: str
    config_tree: dict[str, Any]
    config: Config | None
    manifest: dict[str, Any]
    scalars: dict[str, dict[int, float]]
    curves: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    stages: list[StageInfo]
    rounds: list[RoundLabels]
    log_tail: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.manifest.get("status") == "complete" and RunDir(self.root).final_model.is_file()


def read_scalars(path: Path) -> dict[str, dict[int, float]]:
    """``scalars.jsonl`` as {key: {step: value}}; a step logged twice (after a resume) keeps
    its last value. Blank or torn lines (a run killed mid-write) are skipped."""
    out: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.setdefault(key, {})[step] = float(value)
    return out


def _read_json(path: Path, notes: list[str], what: str) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{what} ({path.name}) could not be read: {type(exc).__name__}")
        return None


def _load_config(root: Path) -> tuple[str, dict[str, Any], Config | None, str | None]:
    path = RunDir(root).config
    if not root.exists():
        raise UserError(f"run directory not found: {root}")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory (expected a dast run directory)")
    if not path.is_file():
        raise UserError(
            f"{root} is not a dast run directory: it has no config.yaml (made by `dast train --out`), "
            "nor is it a demo folder (report.json, made by `dast demo --out`), nor are there run directories below it"
        )
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(
            f"{path} cannot be read as YAML ({type(exc).__name__}); is {root} a dast run directory?"
        ) from exc
    if (
        not isinstance(tree, dict)
        or not isinstance(tree.get("source"), dict)
        or not isinstance(tree.get("target"), dict)
    ):
        raise UserError(f"{root} is not a dast run directory: {path.name} has no 'source' and 'target' datasets")
    try:
        return text, tree, from_tree(tree, str(path)), None
    except UserError as exc:  # an older or newer config schema: still show what we can
        return text, tree, None, str(exc)


def planned_stages(cfg: Config | None, manifest: dict[str, Any], root: Path) -> list[str]:
    """The stages the config asks for, plus any the manifest or the directory already has."""
    names = {STAGE1}
    if cfg is not None and cfg.self_training.mode == "online":
        names.add(ONLINE)
    elif cfg is not None:
        names.update(round_name(k) for k in range(1, cfg.self_training.rounds + 1))
    names.update(str(k) for k in manifest.get("stages", {}))
    names.update(RunDir(root).stage_names())
    return sorted(names, key=stage_sort_key)


def latest_checkpoint(stage_dir: Path) -> tuple[int, Path] | None:
    """(step, path) of the newest ``checkpoints/step_*.safetensors`` of a stage, if any."""
    found = StageDir(stage_dir).checkpoint_files()
    return found[-1] if found else None


def _stage_info(root: Path, name: str, entry: dict[str, Any]) -> StageInfo:
    stage_dir = root / name
    status = str(entry.get("status") or ("started" if stage_dir.is_dir() else "not started"))
    info = StageInfo(name=name, status=status, steps=entry.get("steps"))
    selected = StageDir(stage_dir).selected
    if selected.is_file():
        try:
            sel = read_meta(selected).get("selection") or {}
            info.selected_step = sel.get("step")
            info.selected_value = sel.get("value")
            info.selected_key = sel.get("key")
        except UserError:
            pass
    latest = latest_checkpoint(stage_dir)
    info.latest_checkpoint = latest[0] if latest else None
    return info


def _round_labels(root: Path, name: str) -> RoundLabels:
    folder = RunDir(root).stage(name).pseudo_labels
    rl = RoundLabels(name=name, folder=folder, exists=folder.is_dir(), complete=(folder / PL_COMPLETE).is_file())
    if not rl.exists:
        rl.note = "no pseudo labels yet (the round has not started)"
        return rl
    notes: list[str] = []
    stats = _read_json(folder / PL_STATS, notes, f"{name} pseudo-label stats")
    rl.stats = stats if isinstance(stats, dict) else None
    if notes:
        rl.note = notes[0]
    elif not rl.complete:
        rl.note = "incomplete: the labels are still being written (no COMPLETE marker)"
    preview = folder / PL_PREVIEW
    if preview.is_dir():
        for p in sorted(preview.glob("*.png"))[:PREVIEW_LIMIT]:
            try:
                data = p.read_bytes()
            except OSError:
                continue
            if data.startswith(b"\x89PNG\r\n\x1a\n"):
                rl.previews.append((p.name, data))
    return rl


def _log_tail(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return lines[-LOG_TAIL_LINES:]


def read_run(run_dir: str | Path) -> RunContents:
    """Read a run directory; a directory without a dast ``config.yaml`` is a UserError."""
    root = Path(run_dir)
    run = RunDir(root)
    text, tree, cfg, cfg_error = _load_config(root)
    notes: list[str] = []
    if cfg_error:
        notes.append(f"config.yaml does not validate with this dast version ({cfg_error}); samples are skipped")
    manifest = _read_json(run.manifest, notes, "the manifest")
    if not isinstance(manifest, dict):
        manifest = {"stages": {}}
    manifest.setdefault("stages", {})
    curves = _read_json(run.curves, notes, "the evaluation history")
    metrics = _read_json(run.final_metrics, notes, "the final metrics")
    stages = [_stage_info(root, n, manifest["stages"].get(n, {})) for n in planned_stages(cfg, manifest, root)]
    rounds = [_round_labels(root, s.name) for s in stages if s.name not in (STAGE1, ONLINE)]  # online: no label files
    return RunContents(
        root=root,
        config_text=text,
        config_tree=tree,
        config=cfg,
        manifest=manifest,
        scalars=read_scalars(run.scalars),
        curves=[c for c in curves if isinstance(c, dict)] if isinstance(curves, list) else [],
        metrics=metrics if isinstance(metrics, dict) and isinstance(metrics.get("per_class"), dict) else None,
        stages=stages,
        rounds=rounds,
        log_tail=_log_tail(run.log),
        notes=notes,
    )


def choose_model(run: RunContents) -> tuple[Path, str] | None:
    """The model to show predictions of: the final model, else the latest selected one,
    else the newest training checkpoint. Returns (path, description) or None."""
    final = RunDir(run.root).final_model
    if final.is_file():
        return final, "the final model (final/model.safetensors)"
    for stage in reversed(run.stages):
        sel = RunDir(run.root).stage(stage.name).selected
        if sel.is_file():
            return (
                sel,
                f"the selected model of {stage.name} ({stage.name}/selected.safetensors; the run is not finished)",
            )
    for stage in reversed(run.stages):
        latest = latest_checkpoint(run.root / stage.name)
        if latest is not None:
            step, path = latest
            return path, (
                f"the latest checkpoint of {stage.name} (step {step}; nothing selected yet, the run is not finished)"
            )
    return None


def missing_parts(run: RunContents) -> list[str]:
    """What an unfinished run still lacks, one short phrase each."""
    out = [f"{s.name} is {s.status}" for s in run.stages if s.status != "complete"]
    if not RunDir(run.root).final_model.is_file():
        out.append("no final model (final/model.safetensors)")
    if run.metrics is None:
        if run.config is not None and run.config.val is None:
            out.append("no final metrics: the config has no labelled val set")
        else:
            out.append("no final metrics (final/metrics.json)")
    return out


def class_names(run: RunContents, num_classes: int | None = None) -> list[str]:
    """Class names in train-id order: from the final metrics, else from the config's table."""
    if run.metrics is not None:
        return [str(k) for k in run.metrics["per_class"]]
    if run.config is not None:
        try:
            return list(table_for(run.config.source, run.config.model.num_classes).names)
        except UserError:
            pass
    n = num_classes if num_classes is not None else (run.config.model.num_classes if run.config else 0)
    return [f"class {i}" for i in range(n)]
