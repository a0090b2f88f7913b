"""DataLoader workers: deaf to the stop signals that are the main process's business, never
blocking the interpreter's exit, shut down deterministically when iteration fails."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dast.data.workers import close_loader_iterator, loader_iterator, worker_init

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


class _Pids(Dataset):
    """Each item is the pid of the process that loaded it; item 3 cannot be read."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 3:
            raise ValueError("cannot read item 3")
        return torch.tensor(os.getpid())


def test_workers_survive_sigterm_and_sigint_sent_to_every_process() -> None:
    # a job scheduler signals every process of the job: the workers must outlive it, so that
    # the main process can checkpoint and shut them down itself
    loader = DataLoader(_Pids(), batch_size=1, num_workers=1, worker_init_fn=worker_init(1))
    with loader_iterator(loader) as batches:
        pid = int(next(batches)[0])
        assert pid != os.getpid()
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        assert [int(b[0]) for b in (next(batches), next(batches))] == [pid, pid]
    assert not multiprocessing.active_children()


def test_a_failing_iteration_shuts_its_workers_down() -> None:
    loader = DataLoader(_Pids(), batch_size=1, num_workers=2, worker_init_fn=worker_init(2))
    with pytest.raises(ValueError, match="cannot read item 3"):
        with loader_iterator(loader) as batches:
            for _ in batches:
                pass
    assert not multiprocessing.active_children()


def test_close_loader_iterator_ends_workers_and_ignores_plain_iterators() -> None:
    it = iter(DataLoader(_Pids(), batch_size=1, num_workers=1, worker_init_fn=worker_init(1)))
    next(it)
    assert multiprocessing.active_children()
    close_loader_iterator(it)
    assert not multiprocessing.active_children()
    close_loader_iterator(iter([1, 2]))  # nothing to shut down
    close_loader_iterator(None)
    assert worker_init(0) is None


def test_a_leaked_worker_does_not_block_exit_when_the_main_process_handles_sigterm() -> None:
    # multiprocessing ends daemon children with SIGTERM at exit and then waits for them:
    # a worker that inherited the main process's SIGTERM handler would never exit
    script = textwrap.dedent("""
        import signal, sys
        import torch
        from torch.utils.data import DataLoader
        from dast.data.workers import worker_init
        signal.signal(signal.SIGTERM, lambda *a: None)
        loader = DataLoader(list(range(8)), batch_size=1, num_workers=1, worker_init_fn=worker_init(1))
        it = iter(loader)
        next(it)
        cycle = [it]
        cycle.append(cycle)  # leaked until a collection that never comes
        print("leaked", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "leaked" in proc.stdout
