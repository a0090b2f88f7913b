"""The one definition of the folders dast writes: a training run and a demo output.

A run directory (``dast train --out RUN``)::

    RUN/config.yaml              the resolved config
    RUN/manifest.json            which stages are complete, and what each selected
    RUN/log.txt                  plain-text log
    RUN/tb/                      TensorBoard event files
    RUN/scalars.jsonl            every logged scalar, one JSON object per line
    RUN/curves.json              the evaluation history (selection score, target mIoU)
    RUN/figure4.png              selection score against target mIoU (the paper's Figure 4)
    RUN/report.html              ``dast report RUN``
    RUN/digests/rank<r>.jsonl    parameter checksums (``train.digest_every``)
    RUN/<stage>/                 ``stage1``, then ``round1``, ``round2``, ...
        checkpoints/step_<8+ digits>.safetensors   full training state, the last K kept
        best_step_<8+ digits>.safetensors          the best snapshot while the stage runs
        best.safetensors                           the best snapshot of a finished stage
        selected.safetensors                       what the next stage starts from
        pseudo_labels/                             rounds only: <name>.png, preview/, stats.json, COMPLETE
    RUN/final/model.safetensors, RUN/final/metrics.json

A demo output (``dast demo --out DIR``): ``DIR/report.json``, ``DIR/report.html``, the
figures, and one run directory per trained variant under ``DIR/runs/<run>/`` (several
seeds: ``DIR/seed<S>/`` each holding such a demo output).

Every writer and reader of these folders takes names and patterns from here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# ---- run directory: top-level files
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
LOG = "log.txt"
TENSORBOARD = "tb"
SCALARS = "scalars.jsonl"
CURVES = "curves.json"
FIGURE4 = "figure4.png"
REPORT_HTML = "report.html"
DIGESTS = "digests"

# ---- stages
STAGE1 = "stage1"
FINAL = "final"
FINAL_MODEL = "model.safetensors"
FINAL_METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
SELECTED = "selected.safetensors"
BEST = "best.safetensors"
ROUND_RE = re.compile(r"^round(\d+)$")
ONLINE = "online"  # the stage of online self-training (self_training.mode: online)
CHECKPOINT_RE = re.compile(r"^step_(\d{8,})\.safetensors$")
BEST_STEP_RE = re.compile(r"^best_step_(\d{8,})\.safetensors$")

# ---- pseudo labels
PSEUDO_LABELS = "pseudo_labels"
PL_COMPLETE = "COMPLETE"
PL_STATS = "stats.json"
PL_PREVIEW = "preview"

# ---- demo output
DEMO_REPORT = "report.json"
DEMO_RUNS = "runs"


def round_name(k: int) -> str:
    """The stage name of self-training round ``k`` (1-based)."""
    return f"round{k}"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def best_step_name(step: int) -> str:
    return f"best_step_{step:08d}.safetensors"


def numbered_files(folder: Path, pattern: re.Pattern[str] = CHECKPOINT_RE) -> list[tuple[int, Path]]:
    """The files of ``folder`` named by a step (``pattern``'s first group), sorted by step."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_second_stage(name: str) -> bool:
    """Whether ``name`` is a stage of self-training: ``round<k>`` or ``online``."""
    return name == ONLINE or ROUND_RE.match(name) is not None


def stage_sort_key(name: str) -> tuple[int, int, str]:
    """stage1 first, then round1, round2, ... in numeric order (or online), then anything else."""
    if name == STAGE1:
        return (0, 0, name)
    if name == ONLINE:
        return (1, 0, name)
    m = ROUND_RE.match(name)
    return (1, int(m.group(1)), name) if m else (2, 0, name)


@dataclass(frozen=True)
class StageDir:
    """The folder of one stage (``stage1`` or ``round<k>``)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def checkpoint_files(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, sorted by step."""
        return numbered_files(self.checkpoints, CHECKPOINT_RE)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoint_files()
        return found[-1][1] if found else None

    def best_step(self, step: int) -> Path:
        return self.root / best_step_name(step)

    def best_step_files(self) -> list[tuple[int, Path]]:
        return numbered_files(self.root, BEST_STEP_RE)

    @property
    def best(self) -> Path:
        return self.root / BEST

    @property
    def selected(self) -> Path:
        return self.root / SELECTED

    @property
    def pseudo_labels(self) -> Path:
        return self.root / PSEUDO_LABELS


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def log(self) -> Path:
        return self.root / LOG

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def scalars(self) -> Path:
        return self.root / SCALARS

    @property
    def curves(self) -> Path:
        return self.root / CURVES

    @property
    def figure4(self) -> Path:
        return self.root / FIGURE4

    @property
    def report(self) -> Path:
        return self.root / REPORT_HTML

    def digests(self, rank: int) -> Path:
        return self.root / DIGESTS / f"rank{rank}.jsonl"

    def stage(self, name: str) -> StageDir:
        return StageDir(self.root / name)

    def round(self, k: int) -> StageDir:
        return self.stage(round_name(k))

    def stage_names(self) -> list[str]:
        """The stage folders present (stage1, round<k>), in training order."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if p.is_dir() and (p.name == STAGE1 or is_second_stage(p.name))]
        return sorted(names, key=stage_sort_key)

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def final_model(self) -> Path:
        return self.final / FINAL_MODEL

    @property
    def final_metrics(self) -> Path:
        return self.final / FINAL_METRICS

    def finished(self) -> bool:
        """Whether the run completed: its manifest says so and the final model is there."""
        try:
            status = json.loads(self.manifest.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return False
        return status == "complete" and self.final_model.is_file()

    def has_progress(self) -> bool:
        """Whether the run holds trained weights worth keeping."""
        return (
            any(self.root.glob(f"*/{CHECKPOINTS}/step_*.safetensors"))
            or any(self.root.glob(f"*/{SELECTED}"))
            or self.final.exists()
        )


@dataclass(frozen=True)
class DemoDir:
    """The paths of a ``dast demo`` output folder."""

    root: Path

    @property
    def report_json(self) -> Path:
        return self.root / DEMO_REPORT

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def runs(self) -> Path:
        return self.root / DEMO_RUNS

    def run(self, name: str) -> RunDir:
        return RunDir(self.runs / name)

    def seed(self, seed: int) -> DemoDir:
        """The output of one seed of a several-seed demo."""
        return DemoDir(self.root / f"seed{seed}")

    def figure(self, name: str) -> Path:
        return self.root / name
