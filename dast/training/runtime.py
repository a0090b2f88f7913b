"""Device, precision, seeding and process-group helpers."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dast.config import DistributedConfig, RuntimeConfig
from dast.contexts import autocast
from dast.errors import UserError
from dast.training.levers import Levers, choose_levers


class StepProgress:
    """The last training step this rank reached, as (stage, step): written by the stage
    loop, read by the thread that reports it to the other ranks (:mod:`dast.training.peers`),
    which ``changed`` wakes."""

    def __init__(self) -> None:
        self.last: tuple[str, int] | None = None  # one attribute: replaced atomically
        self.changed = threading.Event()

    def reached(self, stage: str, step: int) -> None:
        self.last = (stage, step)
        self.changed.set()


@dataclass(frozen=True)
class Runtime:
    """Where and how a run executes: the device, its speed levers, and the process group."""

    device: torch.device
    levers: Levers
    deterministic: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    progress: StepProgress = field(default_factory=StepProgress, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.levers.amp_dtype

    @property
    def channels_last(self) -> bool:
        return self.levers.channels_last

    @property
    def compile(self) -> bool:
        return self.levers.compile

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of this runtime (a no-op in full precision)."""
        return autocast(self.device, self.amp_dtype)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, or (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def make_runtime(cfg: RuntimeConfig, device_override: str | None = None) -> Runtime:
    """Resolve ``auto`` settings against the hardware (levers: :func:`choose_levers`)."""
    rank, world, local = distributed_env()
    name = device_override or cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("runtime.device is 'cuda' but no CUDA device is available")
        device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    levers = choose_levers(cfg, device, world_size=world)
    deterministic = cfg.deterministic if cfg.deterministic is not None else device.type == "cpu"
    return Runtime(device, levers, deterministic, rank, world, local)


def configure_backends(rt: Runtime) -> None:
    """cuDNN and matmul settings for this runtime."""
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
        torch.backends.cudnn.enabled = True
        torch.backends.cudnn.benchmark = not rt.deterministic
        torch.backends.cudnn.deterministic = rt.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# How long a collective waits for the other ranks when ``distributed.timeout_s`` is null.
# Legitimate waits are short (one rank writing a checkpoint while the others wait at a
# barrier; uneven shards); a hung rank otherwise holds the job until its wall-clock limit.
GLOO_TIMEOUT_S = 300.0
NCCL_TIMEOUT_S = 600.0


def collective_timeout(cfg: DistributedConfig, device: torch.device) -> float:
    """Seconds a collective may wait: ``distributed.timeout_s``, or the backend's default."""
    if cfg.timeout_s is not None:
        return float(cfg.timeout_s)
    return NCCL_TIMEOUT_S if device.type == "cuda" else GLOO_TIMEOUT_S


def leave_process_group(created: bool) -> None:
    """End a process group that :func:`dast.training.rendezvous.join_group` created, once
    nothing holds it.

    Call it after dropping the DDP-wrapped models: a group that is still referenced keeps its
    gloo worker threads, which may release their last collective's tensors while the
    interpreter finalises and abort the rank ("terminate called without an active
    exception") after a finished run."""
    if created and dist.is_initialized():
        gc.collect()  # DDP wrappers in reference cycles keep the group (and its threads) alive
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()
