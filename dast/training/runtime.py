"""Device, precision, seeding and process-group helpers."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from dast.config import RuntimeConfig
from dast.errors import UserError


@dataclass(frozen=True)
class Runtime:
    """Where and how a run executes."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool
    deterministic: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of this runtime (a no-op in full precision)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, or (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def make_runtime(cfg: RuntimeConfig, device_override: str | None = None) -> Runtime:
    """Resolve ``auto`` settings against the hardware."""
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
    amp: torch.dtype | None
    if cfg.amp == "auto":
        amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    elif cfg.amp == "none":
        amp = None
    elif cfg.amp == "bf16":
        amp = torch.bfloat16
    else:
        if device.type != "cuda":
            raise UserError("runtime.amp 'fp16' needs a CUDA device; use 'bf16' or 'none' on CPU")
        amp = torch.float16
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    deterministic = cfg.deterministic if cfg.deterministic is not None else device.type == "cpu"
    return Runtime(device, amp, channels_last, cfg.compile, deterministic, rank, world, local)


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


def rng_state() -> dict[str, Any]:
    """Snapshot of every random generator, for checkpoints."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def init_process_group(rt: Runtime) -> None:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) when distributed."""
    if rt.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if rt.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)


def barrier(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Put modules in eval mode for the block and restore their previous modes."""
    mods = [m for m in modules if m is not None]
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(mods, modes):
            m.train(was)
