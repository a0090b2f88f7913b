"""Signal handling for DataLoader worker processes."""

from __future__ import annotations

import atexit
import gc
import multiprocessing.util  # noqa: F401 - registers its exit hook on import; worker_init's must come later
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch.utils.data import dataloader

T = TypeVar("T")


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn``: SIGTERM and SIGINT are the main process's business.

    Ctrl-C reaches the whole foreground process group, and job schedulers (SLURM at a time
    limit, ``systemctl stop``, ``pkill``) send SIGTERM to every process of a job. The main
    process then saves a checkpoint and shuts its workers down through the DataLoader; a
    worker that died of the signal first would make the DataLoader raise instead. If the main
    process dies, PyTorch's worker watchdog ends the orphaned workers within seconds.
    """
    del worker_id
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shutdown_leaked_workers() -> None:
    """Shut down the workers of every DataLoader iterator still alive.

    At interpreter exit ``multiprocessing`` ends daemon children with SIGTERM and then waits
    for them; workers that ignore SIGTERM would make it wait forever. Registered to run
    before that (see :func:`worker_init`), this ends them through the DataLoader's own
    shutdown, whatever still references their iterators (an exception's traceback, say).
    """
    kind = getattr(dataloader, "_MultiProcessingDataLoaderIter", None)
    if kind is None:
        return
    for obj in gc.get_objects():
        if type(obj) is kind:
            close_loader_iterator(obj)


def worker_init(num_workers: int) -> Callable[[int], None] | None:
    """The ``worker_init_fn`` for a DataLoader with ``num_workers`` workers.

    With workers, also (re-)registers :func:`shutdown_leaked_workers` at exit: ``atexit``
    runs the newest registration first, so it runs before ``multiprocessing``'s exit hook."""
    if num_workers <= 0:
        return None
    atexit.unregister(shutdown_leaked_workers)
    atexit.register(shutdown_leaked_workers)
    return ignore_stop_signals


def close_loader_iterator(iterator: Any) -> None:
    """Shut the worker processes of a DataLoader iterator down now.

    An exception raised inside ``next()`` keeps the iterator alive in a reference cycle
    (exception → traceback → frame → iterator) until the garbage collector runs, and with it
    its workers; this ends them deterministically. Iterators without workers are left alone.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own clean shutdown
    if callable(shutdown):
        shutdown()


@contextmanager
def loader_iterator(loader: Iterable[T]) -> Iterator[Iterator[T]]:
    """``with loader_iterator(loader) as batches:`` — iterate a DataLoader and shut its workers
    down on leaving the block, whether it ends normally or by an exception."""
    it = iter(loader)
    try:
        yield it
    finally:
        close_loader_iterator(it)
