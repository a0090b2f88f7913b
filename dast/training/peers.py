"""What each rank of a ``torchrun`` job knows about the others, so that a rank that dies
or hangs stops the job with a message instead of leaving it waiting.

* **Beats.** Every rank runs a daemon thread that writes a beat (a counter, the last step
  the rank reached, and its state) into a key-value store after every step and at least
  every :data:`BEAT_S` seconds. A killed or stopped (SIGSTOP) process falls silent; a busy
  one does not, since the thread needs no progress of the training loop.
* **Heartbeat line.** Rank 0's thread also writes, every :func:`heartbeat_period`
  seconds, one line in the run's log with the last step of every rank, and how long a
  silent one has been silent.
* **Diagnosis.** When a collective fails (gloo: the connection of a dead peer closes at
  once; a hung peer makes it time out after ``distributed.timeout_s``),
  :func:`lost_rank_error` watches the beats for up to :data:`SILENT_S` seconds and names
  the ranks that stay silent (killed, or stopped), or else, after a timeout, the live
  ranks whose main thread never reached the collective (they do not mark themselves
  failed); :class:`RankLost` carries the one-line message.
* **Agreed choices.** :func:`agreed_latest_checkpoint`: every rank restores the checkpoint
  rank 0 sees as the latest.
* **Agreed stop.** :func:`agreed_stop_signal`: a SIGTERM/SIGINT seen by any rank stops
  every rank after the same step (one scalar all-reduce per step), so the checkpoint it
  writes and the barrier after it are reached by all ranks.

The beats' store is torchrun's own where it shares it with the workers (it outlives every
worker), else the process group's; beats use a connection of their own with a short
timeout (:mod:`dast.training.rendezvous`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dast.rundir import StageDir
from dast.training.rendezvous import STORE_TIMEOUT_S
from dast.training.runtime import Runtime, StepProgress

BEAT_S = 0.5  # how often each rank writes its beat
SILENT_S = 2.0  # a rank whose beat does not change for this long is lost
KEY_PREFIX = "dast/beat/"


def heartbeat_period(timeout_s: float) -> float:
    """Seconds between rank 0's heartbeat lines: a quarter of the collective timeout (so a
    hang shows in the log before the timeout stops the run), between 1 s and 60 s."""
    return min(60.0, max(1.0, timeout_s / 4))


TRAINING, FAILED, DONE = "training", "failed", "done"


@dataclass(frozen=True)
class Beat:
    """One rank's latest beat: its counter, the last (stage, step) it reached, and its
    state: ``training``, ``failed`` (a collective of its own failed: it is stopping) or
    ``done`` (it finished its work and stopped beating on purpose)."""

    count: int
    last: tuple[str, int] | None
    state: str = TRAINING

    def describe(self) -> str:
        return f"{self.last[0]} step {self.last[1]}" if self.last is not None else "no step yet"


class RankLost(RuntimeError):
    """Another rank died or hung, and this rank stopped; the message names it."""

    def __init__(self, message: str, lost: list[int]) -> None:
        super().__init__(message)
        self.lost = lost


class RankWatch:
    """This rank's beat thread, rank 0's heartbeat line, and the diagnosis of lost ranks."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world: int,
        progress: StepProgress,
        *,
        log: logging.Logger | None = None,
        heartbeat_every: float = 60.0,
        beat_s: float = BEAT_S,
    ) -> None:
        self.store, self.rank, self.world, self.progress = store, rank, world, progress
        self.log, self.heartbeat_every, self.beat_s = log, heartbeat_every, beat_s
        self._count, self._state = 0, TRAINING
        self._lock = threading.Lock()  # beats come from the thread and from mark()
        self._broken = False  # the store failed once: it is not asked again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dast-rank-beat", daemon=True)
        # rank 0's view for the heartbeat line: each rank's counter and when it last changed
        self._seen: dict[int, tuple[int, float]] = {}

    # ------------------------------------------------------------------ beats
    def start(self) -> RankWatch:
        self._beat()  # the key exists before any collective can fail
        self._thread.start()
        return self

    def stop(self, done: bool = False) -> None:
        """End the beat thread (idempotent); ``done``: this rank finished its work, and a
        diagnosis on another rank must not count it as lost."""
        self._stop.set()
        self.progress.changed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * STORE_TIMEOUT_S)
        if done:
            self.mark(DONE)

    def mark(self, state: str) -> None:
        """Tell the other ranks this rank's new state at once."""
        self._state = state
        self._beat()

    def _run(self) -> None:
        next_line = time.monotonic() + self.heartbeat_every
        while not self._stop.is_set():
            self.progress.changed.wait(self.beat_s)  # a new step, or time for a beat
            self.progress.changed.clear()
            if self._stop.is_set():
                break
            self._beat()
            if self.rank == 0 and self.log is not None:
                beats = self.read()
                self._remember(beats)
                if time.monotonic() >= next_line:
                    next_line = time.monotonic() + self.heartbeat_every
                    self.log.info("heartbeat: %s", self.summary(beats))

    def _beat(self) -> None:
        with self._lock:
            if self._broken:
                return
            self._count += 1
            doc = {"count": self._count, "last": self.progress.last, "state": self._state}
            try:
                self.store.set(_key(self.rank), json.dumps(doc))
            except RuntimeError:  # the store is gone (each try would print a C++ error): stop using it
                self._broken = True

    def read(self) -> dict[int, Beat]:
        """The latest beat of every rank that wrote one (empty when the store is unreachable)."""
        keys = [_key(r) for r in range(self.world)]
        if self._broken:
            return {}
        try:
            if self.store.check(keys):
                values = self.store.multi_get(keys)
                present = list(range(self.world))
            else:  # some rank has not started yet
                present = [r for r in range(self.world) if self.store.check([_key(r)])]
                values = [self.store.get(_key(r)) for r in present]
        except RuntimeError:
            self._broken = True
            return {}
        out = {}
        for r, raw in zip(present, values):
            doc = json.loads(bytes(raw).decode())
            last = doc.get("last")
            out[r] = Beat(int(doc["count"]), (str(last[0]), int(last[1])) if last else None, str(doc["state"]))
        return out

    # ------------------------------------------------------------------ rank 0's heartbeat line
    def _remember(self, beats: dict[int, Beat]) -> None:
        now = time.monotonic()
        for r, b in beats.items():
            if r not in self._seen or self._seen[r][0] != b.count:
                self._seen[r] = (b.count, now)

    def summary(self, beats: dict[int, Beat]) -> str:
        """``rank 0 stage1 step 12; rank 1 stage1 step 11 (no beat for 9 s)``."""
        now, parts = time.monotonic(), []
        for r in range(self.world):
            if r not in beats:
                parts.append(f"rank {r} not started")
                continue
            text = f"rank {r} {beats[r].describe()}"
            if beats[r].state != TRAINING:
                parts.append(f"{text} ({beats[r].state})")
                continue
            changed = self._seen.get(r, (0, now))[1]
            if now - changed >= SILENT_S:
                text += f" (no beat for {now - changed:.0f} s)"
            parts.append(text)
        return "; ".join(parts)

    # ------------------------------------------------------------------ diagnosis
    def lost_ranks(self, window: float = SILENT_S) -> tuple[list[int], dict[int, Beat]] | None:
        """The ranks whose beat does not change within ``window`` seconds, with the last
        beats seen; None when the store cannot be read. Returns as soon as every other
        rank has beaten."""
        first = self.read()
        if not first:
            return None
        alive, latest = {self.rank} | {r for r, b in first.items() if b.state == DONE}, dict(first)
        end = time.monotonic() + window
        while len(alive) < self.world and time.monotonic() < end:
            time.sleep(self.beat_s / 2)
            now = self.read()
            for r, b in now.items():
                latest[r] = b
                if r not in first or b.count != first[r].count or b.state == DONE:
                    alive.add(r)
        return sorted(set(range(self.world)) - alive), latest

    def stuck_ranks(self, window: float = SILENT_S) -> tuple[list[int], dict[int, Beat]]:
        """The live ranks still training after ``window`` seconds, while this rank's
        collective failed: their main thread never reached the collective (the other ranks
        that were waiting in it mark themselves failed when it times out for them too)."""
        end, beats = time.monotonic() + window, self.read()
        while time.monotonic() < end and any(b.state == TRAINING for r, b in beats.items() if r != self.rank):
            time.sleep(self.beat_s / 2)
            beats = self.read() or beats
        return sorted(r for r, b in beats.items() if r != self.rank and b.state == TRAINING), beats


def _key(rank: int) -> str:
    return f"{KEY_PREFIX}{rank}"


def start_watch(rt: Runtime, store: Any | None, log: logging.Logger | None, timeout_s: float) -> RankWatch | None:
    """Start this rank's :class:`RankWatch` on ``store`` (:func:`dast.training.rendezvous.join_group`
    gives it); None when there is no store (a single process)."""
    if store is None:
        return None
    watch = RankWatch(store, rt.rank, rt.world_size, rt.progress, log=log, heartbeat_every=heartbeat_period(timeout_s))
    return watch.start()


# what gloo says when a collective times out (its wordings differ by where it waits), and NCCL's watchdog
TIMEOUT_MARKS = (
    "Timed out waiting",
    "timeout caused pair closure",
    "Operation timed out",
    "collective operation timeout",
)
CLOSED_MARKS = ("Connection closed", "Connection reset", "Broken pipe", "Read error", "EOF")


def failure_cause(exc: BaseException, timeout_s: float) -> str:
    """What the failed collective saw, in a few words."""
    text = str(exc)
    if any(s in text for s in TIMEOUT_MARKS):
        return f"a collective timed out after {timeout_s:g} s"
    if any(s in text for s in CLOSED_MARKS):
        return "its connection closed"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"the collective failed: {first[:120]}"


RESUME_HINT = (
    "The checkpoints are complete: `dast train --resume auto` continues the run "
    "(torchrun --max-restarts does it by itself)"
)


def lost_rank_error(
    watch: RankWatch, exc: BaseException, timeout_s: float, store_host: int | None = None
) -> RankLost | None:
    """A :class:`RankLost` naming the ranks that fell silent after ``exc`` (killed, or
    stopped), or, after a timeout, the live ranks whose training never reached the
    collective (a stuck main thread); None when every rank is alive and ``exc`` is no
    timeout (this rank's own failure). ``store_host``: the rank that serves the beats'
    store, if one does (it is lost when the store is). Takes up to 2 x :data:`SILENT_S`
    seconds, under deferred SIGTERM (:func:`dast.training.session.run_session`)."""
    watch.mark(FAILED)
    found = watch.lost_ranks()
    cause = failure_cause(exc, timeout_s)
    me = f"rank {watch.rank}"
    if found is None:
        if store_host is not None and store_host != watch.rank:
            return RankLost(
                f"{me}: lost rank {store_host} of {watch.world} ({cause}; the store it served is unreachable). "
                + RESUME_HINT,
                [store_host],
            )
        return RankLost(
            f"{me}: lost the other ranks ({cause}; the job's store is unreachable, so the rank that failed "
            "is unknown). " + RESUME_HINT,
            [],
        )
    lost, beats = found
    if lost:
        return RankLost(
            f"{me}: lost rank {_names(lost)} of {watch.world} ({cause}; no beat from it for {SILENT_S:g} s: "
            f"killed or hung); last steps: {_steps(beats)}. " + RESUME_HINT,
            lost,
        )
    if not any(s in str(exc) for s in TIMEOUT_MARKS):
        return None  # every rank is alive: this rank's own failure
    stuck, beats = watch.stuck_ranks()
    if not stuck:
        return RankLost(
            f"{me}: {cause} while every rank is alive and stopping ({_steps(beats)}): the ranks went different "
            "ways, or one is slower than distributed.timeout_s. " + RESUME_HINT,
            [],
        )
    return RankLost(
        f"{me}: rank {_names(stuck)} of {watch.world} stopped responding ({cause}; its process is alive but never "
        f"reached the collective: stuck in its own work); last steps: {_steps(beats)}. " + RESUME_HINT,
        stuck,
    )


def _names(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _steps(beats: dict[int, Beat]) -> str:
    return ", ".join(f"rank {r} {b.describe()}" for r, b in sorted(beats.items()))


@contextlib.contextmanager
def deferred(signum: int) -> Iterator[None]:
    """Ignore ``signum`` while the block runs (main thread only; a no-op elsewhere). A
    handler installed inside the block (the training loop's) takes over, and gives it back."""
    try:
        old = signal.signal(signum, lambda *_: None)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, old)


def agreed_stop_signal(signum: int | None, rt: Runtime) -> int | None:
    """The stop signal any rank received (the largest number), the same on every rank; None
    when none did. Under DDP one scalar all-reduce: every rank stops after the same step."""
    if not rt.distributed or not dist.is_initialized():
        return signum
    device = rt.device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([signum or 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def broadcast_object(obj: Any, rt: Runtime) -> Any:
    """Rank 0's value of ``obj`` on every rank (a collective under DDP)."""
    if not rt.distributed or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed_latest_checkpoint(stage: StageDir, rt: Runtime) -> Path | None:
    """Rank 0's latest complete checkpoint of ``stage``, on every rank: all restore the same
    one even where another node's listing of a network file system lags behind."""
    return broadcast_object(stage.latest_checkpoint() if rt.is_main else None, rt)
