"""The one autocast context and the one eval-mode context of dast."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch


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
