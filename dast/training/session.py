"""The life of a training process around the pipeline: which run to start or resume, the
process group and its collective timeout, the watch on the other ranks, and what a lost
rank turns into.

* ``resume="auto"`` (``dast train --resume auto``): rank 0 looks at the run directory and
  decides, and every rank follows its one broadcast answer (another node's view of a
  network file system may lag): a fresh folder starts, a folder with a run resumes from
  its latest complete checkpoint, a finished run is left as it is (:class:`RunComplete`).
  That makes one command right for the first start and for every restart, which is what
  ``torchrun --max-restarts`` and a requeued SLURM job run.
* The number of ranks is recorded in ``manifest.json`` when a run starts; a resume on a
  different number is refused (:func:`check_world_size`), since the images per step and
  the gradient averaging would change: it could not continue exactly.
* A collective that fails because another rank died or hung becomes a
  :class:`~dast.training.peers.RankLost` naming that rank (:mod:`dast.training.peers`).
"""

from __future__ import annotations

import contextlib
import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

from dast.atomic import TMP_MARK, remove_stale_temps, write_json
from dast.config import Config
from dast.errors import NumericalFault, UserError
from dast.rundir import RunDir
from dast.training.peers import RankLost, RankWatch, broadcast_object, deferred, lost_rank_error, start_watch
from dast.training.rendezvous import join_group, uses_agent_store
from dast.training.runtime import Runtime, collective_timeout, leave_process_group, make_runtime
from dast.training.setup import prepare_run_dir, read_manifest, run_logger

RESUME_AUTO = "auto"
Decision = Literal["start", "resume", "finished"]
T = TypeVar("T")


class RunComplete(Exception):
    """``--resume auto`` found a finished run and left it as it is."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(
            f"{run_dir} holds a finished run ({RunDir(run_dir).final_model.relative_to(run_dir)}); "
            "nothing to do (--resume without 'auto' continues a finished run whose config grew)"
        )


class Session(NamedTuple):
    """What the pipeline runs with: the config, the runtime, and whether it resumes."""

    cfg: Config
    rt: Runtime
    resume: bool


def auto_resume_decision(paths: RunDir) -> Decision:
    """What ``--resume auto`` does with a run directory: ``finished`` (its manifest says
    complete and the final model is there), ``resume`` (it holds a run's config.yaml), or
    ``start``."""
    if paths.finished():
        return "finished"
    if paths.config.is_file():
        return "resume"
    return "start"


def only_temporary_files(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but temporary files of killed writers (a first start
    killed while writing config.yaml): such a folder counts as empty."""
    entries = list(folder.iterdir()) if folder.is_dir() else []
    return bool(entries) and all(p.is_file() and TMP_MARK in p.name for p in entries)


def check_world_size(paths: RunDir, world: int, force: bool) -> None:
    """Refuse to resume a run on another number of ranks than it was trained on, unless forced."""
    recorded = read_manifest(paths).get("world_size")
    if recorded is None or int(recorded) == world or force:
        return
    raise UserError(
        f"{paths.root} was trained on {recorded} rank(s) and is resumed on {world}: the images per step "
        "(train.batch_size x ranks) and the gradient averaging would change, so it cannot continue exactly; "
        f"resume it on {recorded} rank(s) (torchrun --nproc_per_node={recorded}), or add --force to continue "
        f"on {world} anyway (not bitwise; see docs/distributed.md)"
    )


def record_world_size(paths: RunDir, world: int) -> None:
    """Note in ``manifest.json`` how many ranks train the run (rank 0, when it starts)."""
    manifest = read_manifest(paths)
    if manifest.get("world_size") != world:
        manifest["world_size"] = world
        write_json(paths.manifest, manifest)


def decided_by_rank0(rt: Runtime, decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 alone, its answer (or its :class:`UserError`) on every rank."""
    answer: T | None = None
    error: UserError | None = None
    if rt.is_main:
        try:
            answer = decide()
        except UserError as exc:
            error = exc
    answer, error = broadcast_object((answer, error), rt)
    if error is not None:
        raise error
    return answer


def _auto_decision(run_dir: Path, cfg: Config, force: bool, world: int) -> Decision:
    """Rank 0's side of ``--resume auto``: the decision, and the checks of what it implies."""
    paths = RunDir(run_dir)
    decision = auto_resume_decision(paths)
    if decision == "start" and only_temporary_files(run_dir):
        remove_stale_temps(run_dir)
    if decision != "finished":
        prepare_run_dir(run_dir, cfg, decision == "resume", force)
    if decision == "resume":
        check_world_size(paths, world, force)
    return decision


def run_session(
    cfg: Config | None,
    run_dir: Path,
    *,
    resume: bool | str,
    force: bool,
    device: str | None,
    body: Callable[[Session], T],
) -> T:
    """Set up the run's processes, run ``body``, and end what this call started.

    ``resume``: False (a fresh run), True (continue), or ``"auto"`` (decided by rank 0,
    see the module docstring; needs ``cfg``). Raises :class:`RunComplete` when ``"auto"``
    finds a finished run, and :class:`RankLost` when another rank died or hung.
    """
    if resume == RESUME_AUTO:
        if cfg is None:
            raise UserError("--resume auto needs --config: it starts the run when --out holds none")
    else:
        cfg = prepare_run_dir(run_dir, cfg, bool(resume), force)
    rt = make_runtime(cfg.runtime, device)
    # A rank of a distributed run ignores SIGTERM outside the training loop (which saves a
    # checkpoint and stops on it): torchrun's agent sends SIGTERM to the other ranks the
    # moment one dies, and they must live long enough to say which one.
    with deferred(signal.SIGTERM) if rt.distributed else contextlib.nullcontext():
        return _run_in_group(cfg, run_dir, rt, resume, force, body)


def _run_in_group(
    cfg: Config, run_dir: Path, rt: Runtime, resume: bool | str, force: bool, body: Callable[[Session], T]
) -> T:
    """:func:`run_session` once the config and runtime are known."""
    timeout_s = collective_timeout(cfg.distributed, rt.device)
    group = join_group(rt, timeout_s)
    created = group.created
    watch: RankWatch | None = None
    try:
        watch = start_watch(rt, group.beat_store, run_logger(run_dir), timeout_s)
        if resume == RESUME_AUTO:
            decision = decided_by_rank0(rt, lambda: _auto_decision(run_dir, cfg, force, rt.world_size))
            if decision == "finished":
                raise RunComplete(run_dir)
            resume = decision == "resume"
        elif resume:
            decided_by_rank0(rt, lambda: check_world_size(RunDir(run_dir), rt.world_size, force))
        result = body(Session(cfg, rt, bool(resume)))
        if watch is not None:
            watch.stop(done=True)  # a rank that ends before the others is not a lost one
        return result
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # their locals hold the DDP wrappers, which hold the group
        if watch is None or not isinstance(exc, RuntimeError) or isinstance(exc, (NumericalFault, RankLost)):
            raise
        lost = lost_rank_error(watch, exc, timeout_s, store_host=None if uses_agent_store() else 0)
        if lost is None:
            raise
        raise lost from exc
    finally:
        _end(watch, created)


def _end(watch: RankWatch | None, created: bool) -> None:
    """Stop the beat thread, then leave the process group if this process created it."""
    if watch is not None:
        watch.stop()
    leave_process_group(created)
