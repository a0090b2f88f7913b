"""Joining torchrun's process group so that a restarted job never reads the keys of the
attempt it replaces.

``torchrun`` shares its agent's key-value store with the workers
(``TORCHELASTIC_USE_AGENT_STORE=True``, the default of the c10d rendezvous) and keeps
that store across ``--max-restarts`` restarts. The keys a process group writes when it
starts (gloo's listening addresses, NCCL's unique id) carry no attempt number, so a
restarted worker may read those of the dead worker it replaces and fail to connect, or
wait (PyTorch issue 135712). Under a shared store:

* rank 0 serves a fresh store for the process group on a free port and announces it in
  the agent's store with a random nonce;
* every other rank takes an announcement only once it reaches a live store that holds
  the same nonce (a stale announcement names a port where nobody listens any more);
* the beats of :mod:`dast.training.peers` go to the agent's store, which outlives every
  worker (rank 0 included), under the nonce, so no beat of an earlier attempt is read.

Without a shared store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, or a launcher that is
not torchrun) the group starts as PyTorch's ``env://`` method says, and the beats use its
store.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from dast.training.runtime import Runtime

ANNOUNCE_KEY = "dast/group-store"
NONCE_KEY = "dast/nonce"
STORE_TIMEOUT_S = 5.0  # the beat connection's timeout (the store itself may be gone)


@dataclass
class Group:
    """The process group this process joined: whether it created it (and must end it), and
    the store the beats use (None: no beats)."""

    created: bool
    beat_store: Any | None


def uses_agent_store() -> bool:
    """Whether torchrun shares its agent's store with the workers."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def join_group(rt: Runtime, timeout_s: float) -> Group:
    """Join the process group of a distributed run (NCCL on CUDA, gloo on CPU) with
    collectives that fail after ``timeout_s`` seconds; a group that exists already is used
    as it is."""
    if not rt.distributed:
        return Group(False, None)
    if dist.is_initialized():
        return Group(False, _short_clone(dist.distributed_c10d._get_default_store()))
    backend = "nccl" if rt.device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not uses_agent_store():
        dist.init_process_group(backend=backend, timeout=timeout)
        return Group(True, _short_clone(dist.distributed_c10d._get_default_store()))
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if rt.is_main:
        nonce = secrets.token_hex(8)
        store = dist.TCPStore(host, 0, rt.world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        store.set(NONCE_KEY, nonce)
        agent.set(ANNOUNCE_KEY, f"{store.port} {nonce}")
    else:
        store, nonce = _announced_store(agent, host, timeout_s)
    dist.init_process_group(
        backend=backend, store=dist.PrefixStore("pg", store), rank=rt.rank, world_size=rt.world_size, timeout=timeout
    )
    beats = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
    return Group(True, dist.PrefixStore(f"dast/{nonce}", beats))


def _announced_store(agent: Any, host: str, timeout_s: float) -> tuple[Any, str]:
    """The store rank 0 of this attempt announced, and its nonce: announcements are read
    until one names a port that accepts a connection and holds the announced nonce."""
    deadline = time.monotonic() + timeout_s
    while True:
        port_text, nonce = bytes(agent.get(ANNOUNCE_KEY)).decode().split()
        port = int(port_text)
        if _listening(host, port):
            try:
                store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
                if store.check([NONCE_KEY]) and bytes(store.get(NONCE_KEY)).decode() == nonce:
                    store.set_timeout(timedelta(seconds=timeout_s))  # the process group's waits
                    return store, nonce
            except RuntimeError:  # not a store (the port was taken again), or it went away
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 announced no live process-group store within {timeout_s:g} s")
        time.sleep(0.2)


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host:port`` (a quiet probe: a refused
    TCPStore connection prints a C++ error)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _short_clone(store: Any) -> Any | None:
    """Another connection to ``store`` with a short timeout; None for a store type that
    cannot be cloned."""
    try:
        clone = store.clone()
        clone.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
    except (AttributeError, RuntimeError, ValueError):
        return None
    return clone
