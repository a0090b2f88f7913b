"""CUDA-graph machinery: the whole DAST iteration, and inference, replayed from graphs.

* :class:`GraphedStep`: the iteration replayed from two CUDA graphs (gradients, then
  updates); the finiteness check reads one device flag between them.
* :class:`GraphedUpdate`: the update policy (:mod:`dast.training.updates`) that runs it.
* :class:`GraphedCallable`: a forward function (inference) replayed from a CUDA graph.

CUDA-only paths raise :class:`RuntimeError` on other devices; nothing here runs at import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

import torch
from torch import Tensor

from dast.training.step import Batch, StepContext, apply_updates, compute_gradients, losses_finite, zero_grads
from dast.training.updates import Update, train_step


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _require_cuda(t: Tensor, what: str) -> None:
    if t.device.type != "cuda":
        raise RuntimeError(f"{what} needs CUDA tensors (got {t.device.type}); use the eager step on this device")


@overload
def _static_like(t: Tensor, device: torch.device) -> Tensor: ...
@overload
def _static_like(t: Tensor | None, device: torch.device) -> Tensor | None: ...
def _static_like(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else torch.empty_like(t, device=device)


def _copy_into(dst: Tensor | None, src: Tensor | None) -> None:
    if dst is not None and src is not None:
        dst.copy_(src, non_blocking=True)


def _lr_loader(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """``opt.load_lr``: copies the learning rates into the device tensors a captured step reads."""
    load_lr: Callable[[], None] | None = getattr(opt, "load_lr", None)
    if load_lr is None or not getattr(opt, "tensor_lr", True):
        raise RuntimeError(
            f"{type(opt).__name__} keeps its learning rate on the host; "
            "use ForeachSGD(tensor_lr=True) and CapturableAdam"
        )
    return load_lr


class GraphedStep:
    """A DAST iteration replayed from CUDA graphs: ``graphed(batch) -> (scalars, applied)``.

    The first ``warmup`` calls run the eager step on a side stream (cuDNN autotuning,
    optimiser state allocation; each is a real update). The next call captures

    * graph 1: :func:`~dast.training.step.compute_gradients` plus a device flag saying
      whether every loss is finite;
    * graph 2: both optimiser steps,

    and from then on every call copies the batch into static buffers, replays graph 1,
    reads the flag (the only host sync; skipped with ``check_finite=False``, which
    captures both phases into one graph) and replays graph 2 when the losses are finite.
    The learning rates are copied from ``param_groups`` before each replay, so
    schedules that set ``group["lr"]`` keep working. The optimisers must keep their
    learning rates in device tensors (:class:`ForeachSGD` with ``tensor_lr=True``,
    :class:`CapturableAdam`). Batch shapes must not change; after loading weights or
    optimiser state (which replaces tensors) call :meth:`reset`.

    The scalars returned are a fresh copy. ``adv_scale``, when given, is a 0-dim device
    tensor that scales the segmentor's adversarial terms; the caller changes it in place
    (``fill_``) between calls. Not for DDP-wrapped models.
    """

    def __init__(
        self, ctx: StepContext, *, warmup: int = 3, check_finite: bool = True, adv_scale: Tensor | None = None
    ) -> None:
        models = ctx.models
        if models.adversaries is not None or models.seg_no_sync is not None:
            raise RuntimeError("GraphedStep does not support data-parallel (DDP) models")
        self._lr_loaders = [_lr_loader(opt) for opt in (ctx.seg_opt, ctx.disc_opt) if opt is not None]
        self.ctx = ctx
        self.warmup = max(int(warmup), 1)
        self.check_finite = check_finite
        self.device = next(models.segmentor.parameters()).device
        if self.device.type != "cuda":
            raise RuntimeError(f"GraphedStep needs a model on CUDA (got {self.device.type}); use train_step here")
        self.adv_scale = adv_scale  # a device tensor the caller refills in place (adversarial warm-up)
        self.reset()

    def reset(self) -> None:
        """Drop the graphs and buffers; the next calls warm up and capture again."""
        self.calls = 0
        self._static: Batch | None = None
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self._keys: list[str] = []
        self._vals: Tensor | None = None
        self._finite: Tensor | None = None

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def _load_lrs(self) -> None:
        for load_lr in self._lr_loaders:
            load_lr()

    def _capture(self) -> None:
        assert self._static is not None
        zero_grads(self.ctx)
        torch.cuda.synchronize(self.device)
        g1 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g1):
            out, disc_active = compute_gradients(self.ctx, self._static, self.adv_scale)
            self._keys = list(out)
            self._vals = torch.stack([v.float() for v in out.values()])
            self._finite = losses_finite(out)
            if not self.check_finite:
                apply_updates(self.ctx, disc_active)
        self._graphs = [g1]
        if self.check_finite:
            g2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2):
                apply_updates(self.ctx, disc_active)
            self._graphs.append(g2)

    def _stage(self, batch: Batch) -> Batch:
        """Copy ``batch`` into the static buffers (made on the first call)."""
        if self._static is None:
            self._static = Batch(
                _static_like(batch.xs, self.device),
                _static_like(batch.ys, self.device),
                _static_like(batch.xt, self.device),
                _static_like(batch.yt, self.device),
            )
        static = self._static
        for dst, src in ((static.xs, batch.xs), (static.ys, batch.ys), (static.xt, batch.xt), (static.yt, batch.yt)):
            if (dst is None) != (src is None):
                raise RuntimeError(
                    "GraphedStep was built with"
                    + ("out" if dst is None else "")
                    + " target labels; call reset() to change that"
                )
            if dst is not None and src is not None and dst.shape != src.shape:
                raise RuntimeError(f"GraphedStep was built for shape {tuple(dst.shape)}, got {tuple(src.shape)}")
            _copy_into(dst, src)
        return static

    def __call__(self, batch: Batch) -> tuple[dict[str, Tensor], bool]:
        static = self._stage(batch)
        self.calls += 1
        if not self._graphs and self.calls <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                result = train_step(self.ctx, static, self.adv_scale, check_finite=self.check_finite)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return result
        if not self._graphs:
            self._capture()
        self._load_lrs()
        self._graphs[0].replay()
        applied = True
        if self.check_finite:
            assert self._finite is not None
            applied = bool(self._finite)
            if applied:
                self._graphs[1].replay()
        assert self._vals is not None
        vals = self._vals.clone()
        return {k: vals[i] for i, k in enumerate(self._keys)}, applied


class GraphedUpdate:
    """The update policy of :class:`GraphedStep` (single CUDA device, so its finiteness
    check needs no agreement between ranks). An adversarial warm-up factor is written into
    a device tensor that the captured step reads."""

    name = "GraphedStep"

    def __init__(self, ctx: StepContext, *, warmup: int, with_adv_scale: bool) -> None:
        device = next(ctx.models.segmentor.parameters()).device
        self.adv_scale = torch.zeros((), dtype=torch.float32, device=device) if with_adv_scale else None
        self.graphed = GraphedStep(ctx, warmup=warmup, adv_scale=self.adv_scale)

    def __call__(self, ctx: StepContext, batch: Batch, adv_scale: float | None) -> Update:
        if self.adv_scale is not None:
            self.adv_scale.fill_(1.0 if adv_scale is None else float(adv_scale))
        return Update(*self.graphed(batch))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def reset(self) -> None:
        """Captured graphs hold the replaced tensors: capture again."""
        self.graphed.reset()


class GraphedCallable:
    """``fn(*tensors) -> tensor or tuple of tensors`` (no autograd) replayed from a CUDA graph.

    The first ``warmup`` calls run eagerly on a side stream; the next one captures. The
    returned tensors are static buffers, overwritten by the next call: consume or copy
    them first. Input shapes must not change.
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = max(int(warmup), 1)
        self.calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[Tensor] = []
        self._out: Any = None

    def __call__(self, *inputs: Tensor) -> Any:
        for t in inputs:
            _require_cuda(t, "GraphedCallable")
        self.calls += 1
        with torch.no_grad():
            if self._graph is None and self.calls <= self.warmup:
                side = torch.cuda.Stream(inputs[0].device)
                side.wait_stream(torch.cuda.current_stream(inputs[0].device))
                with torch.cuda.stream(side):
                    out = self.fn(*inputs)
                torch.cuda.current_stream(inputs[0].device).wait_stream(side)
                return out
            if self._graph is None:
                self._inputs = [torch.empty_like(t) for t in inputs]
                for dst, src in zip(self._inputs, inputs):
                    dst.copy_(src)
                torch.cuda.synchronize(inputs[0].device)
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):
                    self._out = self.fn(*self._inputs)
            else:
                for dst, src in zip(self._inputs, inputs):
                    if dst.shape != src.shape:
                        raise RuntimeError(
                            f"GraphedCallable was built for shape {tuple(dst.shape)}, got {tuple(src.shape)}"
                        )
                    dst.copy_(src, non_blocking=True)
            self._graph.replay()
            return self._out
