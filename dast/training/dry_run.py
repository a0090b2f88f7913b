"""``dast train --dry-run``: time a few steps of a run's first stage, keep nothing.

:func:`measure` builds the run the way ``dast train`` does, through the training code's own
pieces (a :class:`~dast.training.pipeline.Pipeline` in a temporary folder for the datasets,
the stage plans and the networks; :meth:`Engine.build`, :meth:`Engine.prepare` and
:meth:`Engine.step` for the iterations), times ``steps`` stage-1 iterations (after one
untimed warm-up step, with their batches loaded beforehand, as the data loader's workers
prepare them during training) and one image of each evaluation and of pseudo-labelling,
and deletes the folder. Nothing is
written to the run directory; the networks' weights are thrown away.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from dast.config import Config
from dast.contexts import eval_mode
from dast.errors import UserError
from dast.evaluation.evaluate import evaluate_model
from dast.execution import Execution
from dast.training.engine import Engine
from dast.training.loop import StageData
from dast.training.pipeline import Pipeline
from dast.training.runtime import configure_backends, make_runtime, seed_everything


@dataclass(frozen=True)
class StageOutline:
    """One stage of the run: its steps, evaluations, checkpoints and pseudo-labelled images."""

    name: str
    steps: int
    evaluations: int
    checkpoints: int
    pseudo_label_images: int  # target images labelled before the stage (0 for stage 1)


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` found: the plan, the dataset sizes and the timings."""

    device: str
    threads: int
    stages: tuple[StageOutline, ...]
    sizes: dict[str, int]  # images per dataset role (source, target, val)
    eval_images: dict[str, int]  # images per evaluation: selection (all FDA sets), val
    step_seconds: tuple[float, ...]  # each timed stage-1 iteration
    image_seconds: dict[str, float]  # one image's evaluation (selection, val) or forward (pseudo)
    final_eval_images: int  # the final evaluation on val
    peak_bytes: int
    peak_what: str

    @property
    def step(self) -> float:
        """The step time used for the estimate: the median of the timed steps."""
        return statistics.median(self.step_seconds)

    def seconds(self) -> dict[str, float]:
        """The estimated wall time of the whole run, by part (training, evaluation, pseudo labels)."""
        evals = sum(s.evaluations for s in self.stages)
        per_eval = sum(self.eval_images[k] * self.image_seconds.get(k, 0.0) for k in self.eval_images)
        return {
            "training": self.step * sum(s.steps for s in self.stages),
            "evaluation": evals * per_eval + self.final_eval_images * self.image_seconds.get("val", 0.0),
            "pseudo labels": sum(s.pseudo_label_images for s in self.stages) * self.image_seconds.get("pseudo", 0.0),
        }


def due_count(steps: int, every: int) -> int:
    """How many of a stage's ``steps`` iterations are due for something done every ``every``
    steps and at the stage's last step (an evaluation, a checkpoint)."""
    return steps // every + (1 if steps % every else 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, the device's queued work included."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(cfg: Config, device: str | None = None, steps: int = 3) -> Measurement:
    """Build the run of ``cfg`` as ``dast train`` would (in a temporary folder) and time
    ``steps`` stage-1 iterations, one image of each evaluation set and one pseudo-labelling
    forward; see the module docstring."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--dry-run runs in one process: start it without torchrun")
    rt = make_runtime(cfg.runtime, device)
    configure_backends(rt)
    seed_everything(cfg.seed)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    with tempfile.TemporaryDirectory(prefix="dast-dry-run-") as tmp:
        pipe = Pipeline(cfg, Path(tmp), rt, progress=False)
        try:
            pipe.build_data()
            plans = pipe.plans()
            nets = pipe.prepare_networks()
            engine = Engine.build(plans[0], cfg, nets, rt, log=pipe.log)
            s = engine.ctx.settings
            reads_target = plans[0].adversarial or s.attention or s.forward_target
            data = StageData(cfg, plans[0], rt, pipe.source, pipe.target if reads_target else None)
            engine.train_modes(nets.modules())
            data.open(0)
            try:  # the batches first: in training, the loader's workers prepare them while the step runs
                batches = [engine.prepare(*data.next()) for _ in range(steps + 1)]
            finally:
                data.close()
            engine.step(0, batches[0])  # a warm-up step: first allocations, lazy initialisation
            times = tuple(_timed(partial(engine.step, i, batches[i]), rt.device) for i in range(1, steps + 1))
            image_seconds: dict[str, float] = {}
            model = nets.target_model()
            first_fda = pipe.selection_sets[0][1] if pipe.selection_sets else None
            with eval_mode(*nets.modules()):
                for key, ds in (("selection", first_fda), ("val", pipe.val)):
                    if ds is not None:
                        one = partial(
                            evaluate_model, model, ds, Execution(device=rt.device, progress=False, indices=[0])
                        )
                        image_seconds[key] = _timed(one, rt.device)
                with torch.no_grad():
                    x = pipe.target.prepare_image(0).unsqueeze(0).to(rt.device)
                    image_seconds["pseudo"] = _timed(lambda: model(x), rt.device)
        finally:
            pipe.close()
    tr, evaluates = cfg.train, bool(pipe.selection_sets) or pipe.val is not None
    stages = tuple(
        StageOutline(
            p.name,
            p.steps,
            due_count(p.steps, p.eval_every) if evaluates else 0,
            due_count(p.steps, tr.checkpoint_every),
            len(pipe.target) if p.pseudo_labels else 0,
        )
        for p in plans
    )
    if rt.device.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(rt.device), "CUDA memory allocated by torch"
    else:
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "resident memory of this process"
    return Measurement(
        device=str(rt.device),
        threads=torch.get_num_threads(),
        stages=stages,
        sizes={
            k: len(v) for k, v in (("source", pipe.source), ("target", pipe.target), ("val", pipe.val)) if v is not None
        },
        eval_images={
            "selection": sum(len(ds) for _, ds in pipe.selection_sets),
            "val": len(pipe.val) if pipe.val is not None else 0,
        },
        step_seconds=times,
        image_seconds=image_seconds,
        final_eval_images=len(pipe.val) if pipe.val is not None else 0,
        peak_bytes=int(peak),
        peak_what=what,
    )
