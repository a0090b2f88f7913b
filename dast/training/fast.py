"""Fast-mode helpers: the same DAST iteration with less overhead.

Each helper keeps the math of :func:`dast.training.step.train_step`; only precision
(bf16 autocast) changes values, within the tolerance documented in
``docs/performance.md``.

* :func:`fast_options`: what the fast mode enables on a device (bf16 autocast where
  supported, channels_last and CUDA graphs on CUDA, D(f_t) reuse, foreach optimisers).
* :func:`to_channels_last`: channels_last weights for every 4-d parameter and buffer.
* :func:`compile_segmentor`: ``torch.compile`` of E and P in place; state-dict keys stay.
* :class:`ForeachSGD`: SGD with momentum and weight decay as multi-tensor kernels. It
  also runs the released duplicated parameter list (k sequential updates for a tensor
  listed k times) with one kernel per round instead of one Python loop per tensor; with
  float learning rates it gives the same bits as
  :class:`~dast.training.optim.SequentialDuplicateSGD` and ``torch.optim.SGD`` on CPU.
* :class:`CapturableAdam`: Adam with the step count and learning rate held in device
  tensors, so its step has no host synchronisation.
* :class:`GraphedStep`: the whole iteration replayed from two CUDA graphs (gradients,
  then updates); the finiteness check reads one device flag between them.
* :class:`GraphedCallable`: a forward function (inference) replayed from a CUDA graph.

CUDA-only paths raise :class:`RuntimeError` on other devices; nothing here runs at import.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch
from torch import Tensor, nn

from dast.training.step import StepModels, StepSettings, apply_updates, compute_gradients, losses_finite, train_step


# ---------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class FastOptions:
    """What the fast mode enables; :func:`fast_options` resolves it for a device."""

    amp_dtype: torch.dtype | None
    channels_last: bool
    reuse_discoverer: bool = True
    foreach_optimizers: bool = True
    cuda_graph: bool = False
    compile: bool = False

    def autocast(self, device: torch.device) -> Callable[[], ContextManager[Any]]:
        """An autocast factory for ``device``; the cast cache is off so it can be captured."""
        return autocast_factory(device, self.amp_dtype)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is available on ``device`` (CPU: always; CUDA: sm80+)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def fast_options(device: torch.device | str, *, cuda_graph: bool = True, compile: bool = False) -> FastOptions:
    """The fast mode on ``device``: bf16 autocast where supported; on CUDA also
    channels_last and (unless disabled) the CUDA-graph step."""
    dev = torch.device(device)
    amp = torch.bfloat16 if bf16_supported(dev) else None
    on_cuda = dev.type == "cuda"
    return FastOptions(amp_dtype=amp, channels_last=on_cuda, cuda_graph=on_cuda and cuda_graph, compile=compile)


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], ContextManager[Any]]:
    """``() -> context``: autocast to ``dtype`` without the weight-cast cache (graph-safe),
    or a no-op for full precision."""
    if dtype is None:
        return contextlib.nullcontext

    def make() -> ContextManager[Any]:
        return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)

    return make


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------
# Memory format and compilation


def to_channels_last(*modules: nn.Module | None) -> None:
    """Convert the 4-d parameters and buffers of ``modules`` to channels_last, in place."""
    for m in modules:
        if m is not None:
            m.to(memory_format=torch.channels_last)


def compile_segmentor(segmentor: nn.Module, *, mode: str | None = None, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` the encoder (E), tail and classifier (P) of a segmentor in place.

    ``nn.Module.compile`` swaps the modules' call implementation and adds no wrapper
    module, so ``state_dict()`` keys and the parameters' identities are unchanged.
    Returns ``segmentor``.

    The step backpropagates through the segmentor's graph twice when D(f_t) is reused
    (``retain_graph``), which AOTAutograd's donated-buffer optimisation forbids; this
    turns that optimisation off (a process-wide ``torch._functorch.config`` switch).
    """
    try:
        from torch._functorch import config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except ImportError:  # older torch: no such optimisation
        pass
    for name in ("encoder", "tail", "classifier"):
        getattr(segmentor, name).compile(mode=mode, backend=backend)
    return segmentor


# ---------------------------------------------------------------------------------------
# Optimisers


class _TensorLR:
    """Mix-in: a 0-dim device tensor per parameter group mirroring ``group["lr"]``.

    ``group["lr"]`` stays a float (schedules, state dicts and JSON checkpoints see the
    usual value); :meth:`load_lr` copies it into the tensors without a host sync.
    """

    param_groups: list[dict[str, Any]]

    def _init_lr_tensors(self) -> None:
        self._lr_tensors: list[Tensor] = []

    def _lr_tensor(self, index: int) -> Tensor:
        while len(self._lr_tensors) <= index:
            group = self.param_groups[len(self._lr_tensors)]
            dev = group["params"][0].device if group["params"] else torch.device("cpu")
            self._lr_tensors.append(torch.zeros((), dtype=torch.float32, device=dev))
        return self._lr_tensors[index]

    def load_lr(self) -> None:
        """Copy every group's float learning rate into its device tensor (no host sync)."""
        for i, group in enumerate(self.param_groups):
            self._lr_tensor(i).fill_(float(group["lr"]))


def _check_warm(state: dict[str, Any], key: str) -> None:
    if key not in state and capturing():
        raise RuntimeError("optimiser state must exist before CUDA-graph capture: run eager steps first")


class ForeachSGD(_TensorLR, torch.optim.Optimizer):
    """SGD (momentum, weight decay, no dampening) as multi-tensor kernels.

    A group may carry ``multiplicity`` (one int per parameter, default 1): a tensor with
    multiplicity k receives k sequential updates per step with the same gradient, as the
    released stage-1 parameter list did (see :class:`~dast.training.optim.SequentialDuplicateSGD`).
    Round r updates every tensor with k >= r in one foreach call::

        d = g + wd * p;  buf = momentum * buf + d  (buf starts at 0, i.e. buf = d first);  p -= lr * buf

    ``tensor_lr``: read the learning rates from device tensors (:meth:`load_lr`, done at
    the start of every eager step), so a captured step follows the schedule. With float
    learning rates the kernels are those of ``torch.optim.SGD(foreach=True)``.
    """

    def __init__(self, groups: Iterable[dict[str, Any]] | Iterable[Tensor], lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4, *, tensor_lr: bool = False) -> None:
        groups = list(groups)
        if groups and isinstance(groups[0], Tensor):
            groups = [{"params": groups}]
        for g in groups:
            g["params"] = list(g["params"])  # type: ignore[index]
            mult = g.setdefault("multiplicity", [1] * len(g["params"]))  # type: ignore[union-attr]
            if len(mult) != len(g["params"]) or any(int(k) < 1 for k in mult):  # type: ignore[index]
                raise ValueError("each parameter needs a multiplicity >= 1")
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight decay must be >= 0")
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, multiplicity=None))
        self.tensor_lr = tensor_lr
        self._init_lr_tensors()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if self.tensor_lr and not capturing():
            self.load_lr()
        for gi, group in enumerate(self.param_groups):
            mom, wd = float(group["momentum"]), float(group["weight_decay"])
            items = [(p, int(k)) for p, k in zip(group["params"], group["multiplicity"]) if p.grad is not None]
            if not items:
                continue
            bufs = []
            for p, _ in items:
                state = self.state[p]
                if mom != 0:
                    _check_warm(state, "momentum_buffer")
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    bufs.append(state["momentum_buffer"])
            lr_t = self._lr_tensor(gi) if self.tensor_lr else None
            for r in range(1, max(k for _, k in items) + 1):
                sel = [i for i, (_, k) in enumerate(items) if k >= r]
                params = [items[i][0] for i in sel]
                grads = [items[i][0].grad for i in sel]
                d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else [g.clone() for g in grads]
                if mom != 0:
                    b = [bufs[i] for i in sel]
                    torch._foreach_mul_(b, mom)
                    torch._foreach_add_(b, d)
                    d = b
                if lr_t is None:
                    torch._foreach_add_(params, d, alpha=-float(group["lr"]))
                else:
                    torch._foreach_sub_(params, torch._foreach_mul(d, lr_t))
        return None


class CapturableAdam(_TensorLR, torch.optim.Optimizer):
    """Adam (no weight decay) whose step count and learning rate live in device tensors.

    State per parameter is ``step`` (float32, 0-dim, on the parameter's device),
    ``exp_avg`` and ``exp_avg_sq``, as in ``torch.optim.Adam``::

        m = lerp(m, g, 1 - b1);  v = b2 * v + (1 - b2) * g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0))
        self._init_lr_tensors()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if not capturing():
            self.load_lr()
        for gi, group in enumerate(self.param_groups):
            b1, b2 = (float(b) for b in group["betas"])
            eps = float(group["eps"])
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            steps, m, v = [], [], []
            for p in params:
                state = self.state[p]
                _check_warm(state, "step")
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:  # loaded from a checkpoint on the CPU
                    state["step"] = state["step"].to(p.device, torch.float32)
                steps.append(state["step"])
                m.append(state["exp_avg"])
                v.append(state["exp_avg_sq"])
            torch._foreach_add_(steps, 1.0)
            torch._foreach_lerp_(m, grads, 1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
            bc1 = torch._foreach_pow(b1, steps)  # b1^t
            torch._foreach_sub_(bc1, 1.0)  # b1^t - 1 (negative)
            torch._foreach_reciprocal_(bc1)
            neg_step = torch._foreach_mul(bc1, self._lr_tensor(gi))  # -lr / (1 - b1^t)
            bc2 = torch._foreach_pow(b2, steps)
            torch._foreach_neg_(bc2)
            torch._foreach_add_(bc2, 1.0)
            torch._foreach_sqrt_(bc2)  # sqrt(1 - b2^t)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(m, denom)
            torch._foreach_mul_(update, neg_step)
            torch._foreach_add_(params, update)
        return None


def fast_optimizers(
    segmentor: nn.Module,
    discriminators: Sequence[nn.Module | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    head_lr_mult: float,
    duplicate_params: bool,
    lr_d: float,
    betas: tuple[float, float],
    tensor_lr: bool = True,
) -> tuple[ForeachSGD, CapturableAdam | None]:
    """The fast-mode optimisers, with the parameter groups of
    :func:`~dast.training.optim.segmentor_optimizer` and
    :func:`~dast.training.optim.discriminator_optimizer` (same update rules, same state keys)."""
    from dast.training.optim import segmentor_param_groups

    groups = segmentor_param_groups(segmentor, lr, head_lr_mult, duplicate_params)  # type: ignore[arg-type]
    seg_opt = ForeachSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, tensor_lr=tensor_lr)
    dparams = [p for m in discriminators if m is not None for p in m.parameters()]
    disc_opt = CapturableAdam(dparams, lr=lr_d, betas=betas) if dparams else None
    return seg_opt, disc_opt


# ---------------------------------------------------------------------------------------
# CUDA graphs


def _require_cuda(t: Tensor, what: str) -> None:
    if t.device.type != "cuda":
        raise RuntimeError(f"{what} needs CUDA tensors (got {t.device.type}); use the eager step on this device")


def _static_like(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else torch.empty_like(t, device=device)


def _copy_into(dst: Tensor | None, src: Tensor | None) -> None:
    if dst is not None and src is not None:
        dst.copy_(src, non_blocking=True)


class GraphedStep:
    """A DAST iteration replayed from CUDA graphs; call it like ``train_step`` minus the models.

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

    Returns ``(scalars, applied)`` like ``train_step``; the scalars are a fresh copy.
    Not for DDP-wrapped models.
    """

    def __init__(self, models: StepModels, seg_opt: torch.optim.Optimizer, disc_opt: torch.optim.Optimizer | None,
                 settings: StepSettings, amp_dtype: torch.dtype | None, *, warmup: int = 3,
                 check_finite: bool = True) -> None:
        if models.adversaries is not None or models.seg_no_sync is not None:
            raise RuntimeError("GraphedStep does not support data-parallel (DDP) models")
        for opt in (seg_opt, disc_opt):
            if opt is not None and not (hasattr(opt, "load_lr") and getattr(opt, "tensor_lr", True)):
                raise RuntimeError(f"{type(opt).__name__} keeps its learning rate on the host; "
                                   "use ForeachSGD(tensor_lr=True) and CapturableAdam")
        self.models, self.seg_opt, self.disc_opt, self.settings = models, seg_opt, disc_opt, settings
        self.warmup = max(int(warmup), 1)
        self.check_finite = check_finite
        self.device = next(models.segmentor.parameters()).device
        if self.device.type != "cuda":
            raise RuntimeError(f"GraphedStep needs a model on CUDA (got {self.device.type}); use train_step here")
        self.autocast = autocast_factory(self.device, amp_dtype)
        self.reset()

    def reset(self) -> None:
        """Drop the graphs and buffers; the next calls warm up and capture again."""
        self.calls = 0
        self._static: list[Tensor | None] | None = None
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self._keys: list[str] = []
        self._vals: Tensor | None = None
        self._finite: Tensor | None = None

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def _load_lrs(self) -> None:
        for opt in (self.seg_opt, self.disc_opt):
            if opt is not None:
                opt.load_lr()  # type: ignore[attr-defined]

    def _capture(self) -> None:
        assert self._static is not None
        xs, ys, xt, yt = self._static
        self.seg_opt.zero_grad(set_to_none=True)
        if self.disc_opt is not None:
            self.disc_opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        g1 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g1):
            out, disc_active = compute_gradients(self.models, self.seg_opt, self.disc_opt, xs, ys, xt, yt,  # type: ignore[arg-type]
                                                 self.settings, self.autocast)
            self._keys = list(out)
            self._vals = torch.stack([v.float() for v in out.values()])
            self._finite = losses_finite(out)
            if not self.check_finite:
                apply_updates(self.seg_opt, self.disc_opt, disc_active)
        self._graphs = [g1]
        if self.check_finite:
            g2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2):
                apply_updates(self.seg_opt, self.disc_opt, disc_active)
            self._graphs.append(g2)

    def __call__(self, source_images: Tensor, source_labels: Tensor, target_images: Tensor,
                 target_labels: Tensor | None) -> tuple[dict[str, Tensor], bool]:
        batch = [source_images, source_labels, target_images, target_labels]
        if self._static is None:
            self._static = [_static_like(t, self.device) for t in batch]
        for dst, src in zip(self._static, batch):
            if (dst is None) != (src is None):
                raise RuntimeError("GraphedStep was built with" + ("out" if dst is None else "") +
                                   " target labels; call reset() to change that")
            if dst is not None and src is not None and dst.shape != src.shape:
                raise RuntimeError(f"GraphedStep was built for shape {tuple(dst.shape)}, got {tuple(src.shape)}")
            _copy_into(dst, src)
        xs, ys, xt, yt = self._static
        self.calls += 1
        if not self._graphs and self.calls <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                result = train_step(self.models, self.seg_opt, self.disc_opt, xs, ys, xt, yt,  # type: ignore[arg-type]
                                    self.settings, self.autocast, check_finite=self.check_finite)
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
                        raise RuntimeError(f"GraphedCallable was built for shape {tuple(dst.shape)}, got {tuple(src.shape)}")
                    dst.copy_(src, non_blocking=True)
            self._graph.replay()
            return self._out
