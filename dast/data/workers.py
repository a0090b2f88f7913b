"""Signal handling for DataLoader worker processes."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def detach_worker(worker_id: int = 0) -> None:
    """``worker_init_fn``: move the worker into its own process group.

    SIGTERM and SIGINT sent to the whole group (Ctrl-C, a job scheduler, ``kill -- -PGID``)
    then reach only the main process, which saves a checkpoint and shuts the workers down
    through the DataLoader; a worker killed by them would crash the main process first.
    A SIGTERM sent to the worker itself (``multiprocessing`` does so for daemon children at
    interpreter exit) still ends it, so a leaked worker never blocks the exit. If the main
    process dies, PyTorch's worker watchdog ends the orphaned workers within seconds.
    """
    del worker_id
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's graceful-stop handler


def worker_init(num_workers: int) -> Callable[[int], None] | None:
    """The ``worker_init_fn`` for a DataLoader with ``num_workers`` workers."""
    return detach_worker if num_workers > 0 else None


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
