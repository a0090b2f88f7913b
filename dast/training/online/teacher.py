"""The mean teacher: an exponential moving average (EMA) of the student's weights.

Online self-training (DACS, DAFormer, MIC) labels the target images with a *teacher*
whose weights follow the student's slowly. At training iteration ``i`` (0-based), before
the iteration's forward passes, i.e. once the student has taken ``i`` optimiser steps,
every teacher parameter becomes

    t <- w * t + (1 - w) * s,    w = min(1 - 1 / (i + 1), alpha)

so at iteration 0 the teacher is a copy of the student (w = 0), at iteration 1 the mean
of the start and the student (w = 1/2), and from iteration ``1 / (1 - alpha) - 1`` on an
average over about ``1 / (1 - alpha)`` steps (DACS and DAFormer: alpha = 0.999; DAFormer
copies at iteration 0 and calls its update with ``i`` from iteration 1 on).

Invariants:

* The update is a pure function of the teacher's and the student's tensors and the step:
  the same inputs give the same bits on every rank (no collective, no randomness), so
  data-parallel ranks whose students are identical keep identical teachers.
* Nothing is read back to the host: ``update`` issues device kernels only.
* The teacher never receives gradients (its parameters have ``requires_grad=False`` and
  ``predict`` runs under ``torch.no_grad()``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dast.errors import CheckpointError

BufferRule = Literal["copy", "ema"]
BUFFER_RULES = ("copy", "ema")


def ema_weight(step: int, alpha: float) -> float:
    """The teacher's EMA coefficient at 0-based step ``step``: ``min(1 - 1/(step + 1), alpha)``.

    The ramp (0 at step 0, 1/2 at step 1, ...) lets the teacher follow the student closely
    while the student changes fast; DACS and DAFormer use it with ``alpha = 0.999``.
    """
    if step < 0:
        raise ValueError(f"the EMA step must be >= 0, got {step}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the EMA alpha must be in [0, 1], got {alpha}")
    return min(1.0 - 1.0 / (int(step) + 1), float(alpha))


def has_foreach() -> bool:
    """Whether this PyTorch has the multi-tensor ``_foreach_mul_`` / ``_foreach_add_`` kernels."""
    return hasattr(torch, "_foreach_mul_") and hasattr(torch, "_foreach_add_")


def ema_update_(
    teacher: Sequence[Tensor], student: Sequence[Tensor], weight: float, foreach: bool | None = None
) -> None:
    """In place, for every pair: ``t <- weight * t + (1 - weight) * s``.

    Computed as ``t.mul_(weight).add_(s, alpha=1 - weight)``: with the multi-tensor
    ``torch._foreach_mul_`` / ``torch._foreach_add_`` kernels when ``foreach`` (default:
    when this PyTorch has them), else a loop of the same two per-tensor operations. Both are
    elementwise and deterministic. ``weight`` is a host float: nothing is read back.
    """
    if len(teacher) != len(student):
        raise ValueError(f"the teacher has {len(teacher)} tensors and the student {len(student)}")
    if not teacher:
        return
    w = float(weight)
    if has_foreach() if foreach is None else foreach:
        torch._foreach_mul_(list(teacher), w)
        torch._foreach_add_(list(teacher), list(student), alpha=1.0 - w)
        return
    for t, s in zip(teacher, student):
        t.mul_(w).add_(s, alpha=1.0 - w)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper, else itself."""
    return module.module if isinstance(module, (DistributedDataParallel, nn.DataParallel)) else module


TensorPairs = list[tuple[Tensor, Tensor]]


def _split_buffers(pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor], TensorPairs]:
    """(teacher floats, student floats, the other pairs) of (teacher, student) buffer pairs."""
    tf: list[Tensor] = []
    sf: list[Tensor] = []
    other: TensorPairs = []
    for t, s in pairs:
        if t.is_floating_point():
            tf.append(t)
            sf.append(s)
        else:
            other.append((t, s))
    return tf, sf, other


class Teacher:
    """An EMA copy of a student network, used only to predict.

    ``buffers`` says what happens to the buffers (BatchNorm running mean/var and the
    batch counter) at each update:

    * ``"copy"`` (default): the teacher takes the student's buffers as they are, i.e. the
      running statistics the student has gathered on its recent batches.
    * ``"ema"``: floating-point buffers get the same EMA as the parameters; integer ones
      (``num_batches_tracked``) are copied.

    DAFormer averages ``parameters()`` only and runs its teacher with BatchNorm in train
    mode, so its teacher normalises every batch with that batch's own statistics. Here
    ``batch_stats=True`` does that in :meth:`predict` (without touching the teacher's
    running statistics); the default, ``False``, normalises with the running statistics
    (eval mode). Dropout is always off in :meth:`predict`.

    ``alpha`` is the EMA's upper bound (DACS/DAFormer: 0.999).
    """

    def __init__(
        self, student: nn.Module, alpha: float = 0.999, buffers: BufferRule = "copy", batch_stats: bool = False
    ) -> None:
        if buffers not in BUFFER_RULES:
            raise ValueError(f"unknown buffer rule {buffers!r}; choose one of {', '.join(BUFFER_RULES)}")
        ema_weight(0, alpha)  # checks alpha
        self.alpha = float(alpha)
        self.module: nn.Module = copy.deepcopy(_unwrap(student))
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()
        self.buffers: BufferRule = buffers
        self.batch_stats = bool(batch_stats)
        self._names = [n for n, _ in self.module.named_parameters()]
        self._buffer_names = [n for n, _ in self.module.named_buffers()]

    def _pairs(self, student: nn.Module) -> tuple[list[Tensor], list[Tensor], TensorPairs]:
        s = _unwrap(student)
        s_params = list(s.named_parameters())
        s_buffers = list(s.named_buffers())
        if [n for n, _ in s_params] != self._names or [n for n, _ in s_buffers] != self._buffer_names:
            raise ValueError("the student's parameters or buffers do not match the teacher's (a different network?)")
        t_params: list[Tensor] = [p for _, p in self.module.named_parameters()]
        t_buffers = [b for _, b in self.module.named_buffers()]
        return t_params, [p.detach() for _, p in s_params], list(zip(t_buffers, [b.detach() for _, b in s_buffers]))

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """At 0-based iteration ``step`` (the student has taken ``step`` optimiser steps):
        EMA of the parameters with weight :func:`ema_weight` ``(step, alpha)``, then the
        buffers by the ``buffers`` rule. Returns the weight used (a host float); reads
        nothing back from the device."""
        w = ema_weight(step, self.alpha)
        t_params, s_params, buffer_pairs = self._pairs(student)
        ema_update_(t_params, s_params, w)
        if self.buffers == "ema":
            tf, sf, other = _split_buffers(buffer_pairs)
            ema_update_(tf, sf, w)
        else:
            other = buffer_pairs
        for t, s in other:
            t.copy_(s)
        return w

    @torch.no_grad()
    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """The teacher's forward pass (``module(*args, **kwargs)``) under ``torch.no_grad()``,
        with dropout off and BatchNorm as chosen by ``batch_stats``."""
        self.module.eval()
        if not self.batch_stats:
            return self.module(*args, **kwargs)
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [m.track_running_stats for m in norms]
        try:
            for m in norms:  # batch statistics, and the running ones left untouched
                m.train()
                m.track_running_stats = False
            return self.module(*args, **kwargs)
        finally:
            for m, tracked in zip(norms, saved):
                m.track_running_stats = tracked
                m.eval()

    __call__ = predict

    def state_dict(self) -> dict[str, Tensor]:
        """The teacher's parameters and buffers as a flat ``{name: tensor}`` dict (detached
        references, like ``nn.Module.state_dict``: clone them to keep them across updates)."""
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy a :meth:`state_dict` back in; a CheckpointError names missing or unexpected
        keys and shape mismatches."""
        own = self.module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
            raise CheckpointError(f"the teacher's state does not fit its network: {'; '.join(parts)}")
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise CheckpointError(
                    f"the teacher's state does not fit its network: {k} has shape "
                    f"{tuple(state[k].shape)}, expected {tuple(v.shape)}"
                )
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])

    def to(self, device: torch.device | str) -> Teacher:
        """Move the teacher's network to ``device``; returns self."""
        self.module.to(device)
        return self
