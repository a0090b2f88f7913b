"""The one autocast context, the one table of autocast names and the one eval-mode context of dast."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

# The autocast choices, spelt alike by every command (``--amp``) and the config
# (``runtime.amp``, which adds ``auto``): name -> dtype, None for full precision.
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Deprecated spellings still accepted on the command line (with a note), and what they mean.
AMP_ALIASES: dict[str, str] = {"off": "none"}


def amp_dtype(name: str) -> torch.dtype | None:
    """The dtype of an autocast name (``none``, ``bf16``, ``fp16``; or a deprecated alias)."""
    name = AMP_ALIASES.get(name, name)
    if name not in AMP_DTYPES:
        raise ValueError(f"unknown autocast name {name!r}; choose from {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[name]


def amp_name(dtype: torch.dtype | None) -> str:
    """The autocast name of a dtype (the inverse of :func:`amp_dtype`)."""
    for name, d in AMP_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"no autocast name for {dtype}")


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device``'s type, or a no-op for full precision (``None``).

    The weight-cast cache is off: the values are the same, and a region that runs under
    it can be captured in a CUDA graph.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=False)


def autocast_factory(
    device: torch.device | str, dtype: torch.dtype | None
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """``() -> context``: :func:`autocast` bound to a device and dtype (what the step takes)."""
    return functools.partial(autocast, device, dtype)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Put modules in eval mode for the block and restore every submodule's previous mode
    (a module whose parts were in mixed modes gets exactly those back)."""
    flags = [(m, m.training) for top in modules if top is not None for m in top.modules()]
    for top in modules:
        if top is not None:
            top.eval()
    try:
        yield
    finally:
        for m, was in flags:
            m.training = was
