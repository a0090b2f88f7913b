"""Speed levers, chosen from what the device actually does well.

A lever changes how fast an iteration runs, never what it computes beyond floating-point
precision:

* ``amp``: bf16 (or fp16) autocast;
* ``channels_last``: the NHWC memory format that cuDNN's convolutions prefer;
* ``cuda_graphs``: the whole iteration replayed from CUDA graphs (one GPU);
* ``compile``: ``torch.compile`` of the segmentor halves;
* ``optimizers``: ``released`` (torch's SGD/Adam, the released duplicated SGD) or ``foreach``
  (multi-tensor kernels, graph-capturable; see :mod:`dast.training.optim`).

:func:`choose_levers` turns a request (the ``runtime`` section of a config) into the
levers a device runs, with the reason for each decision. A lever that would make the
device slower is turned off even when asked for: bf16 on a CPU without native bf16
instructions is emulated and was measured 15x slower than fp32 (AMD EPYC, AVX2 only;
``docs/performance.md``), so ``amp: bf16`` falls back to fp32 there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dast.config import RuntimeConfig
from dast.contexts import amp_name
from dast.errors import UserError
from dast.training.updates import needs_loss_scaling

OPTIMIZER_CHOICES = ("auto", "released", "foreach")


@dataclass(frozen=True)
class Capabilities:
    """What a device can do natively, as far as the levers care."""

    device_type: str
    native_bf16: bool
    detail: str


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private probes, present since torch 2.3
    try:
        return bool(check()) if callable(check) else False
    except Exception:  # noqa: BLE001 - a probe that fails means "not available"
        return False


def device_capabilities(device: torch.device | str) -> Capabilities:
    """Native bf16 on ``device``: a CUDA GPU of compute capability 8.0 or newer, or a CPU
    with AVX512-BF16 or AMX instructions."""
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(dev) if torch.cuda.is_available() else "no CUDA device"
        return Capabilities("cuda", ok, f"{name}: bf16 {'native' if ok else 'not supported'}")
    bf16 = _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")
    isa = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    return Capabilities(dev.type, bf16, f"CPU {isa}, {'native bf16 (AVX512-BF16/AMX)' if bf16 else 'no native bf16'}")


@dataclass(frozen=True)
class Levers:
    """The speed levers one device runs, and why each is on or off."""

    amp_dtype: torch.dtype | None
    channels_last: bool
    cuda_graphs: bool
    compile: bool
    optimizers: str  # "released" | "foreach"
    why: dict[str, str] = field(default_factory=dict, compare=False)

    def describe(self) -> dict[str, Any]:
        """The levers as JSON-able fields (what ``dast bench`` prints per row)."""
        return {
            "amp": amp_name(self.amp_dtype),
            "channels_last": self.channels_last,
            "cuda_graph": self.cuda_graphs,
            "compile": self.compile,
            "optimizers": self.optimizers,
            "levers_why": dict(self.why),
        }


def _amp(request: str, device: torch.device, caps: Capabilities) -> tuple[torch.dtype | None, str]:
    if request == "none":
        return None, "fp32 as requested"
    if request == "fp16":
        if device.type != "cuda":
            raise UserError("runtime.amp 'fp16' needs a CUDA device; use 'bf16' or 'none' on CPU")
        return torch.float16, "fp16 autocast as requested (with gradient scaling)"
    if request == "auto" and device.type != "cuda":
        return None, "auto keeps fp32 on the CPU"
    if caps.native_bf16:
        return torch.bfloat16, f"bf16 autocast ({caps.detail})"
    return None, f"bf16 off: {caps.detail}; emulated bf16 would be slower than fp32"


def choose_levers(request: RuntimeConfig, device: torch.device | str, *, world_size: int = 1) -> Levers:
    """The levers ``device`` runs for ``request``; see the module docstring."""
    dev = torch.device(device)
    caps = device_capabilities(dev)
    cuda = dev.type == "cuda"
    amp, amp_why = _amp(request.amp, dev, caps)
    if request.channels_last is None:
        channels_last, cl_why = cuda, ("on: cuDNN prefers NHWC" if cuda else "off: no gain measured on the CPU")
    else:
        channels_last, cl_why = bool(request.channels_last), "as requested"
    graphs = bool(request.cuda_graphs) and cuda and world_size == 1 and not needs_loss_scaling(amp)
    if graphs:
        graphs_why = "on: one CUDA device"
    elif request.cuda_graphs and needs_loss_scaling(amp):
        graphs_why = "off: fp16 needs gradient scaling, which the captured step does not do (use bf16 for graphs)"
    elif request.cuda_graphs:
        graphs_why = f"off: runtime.cuda_graphs needs a single CUDA device (device {dev}, {world_size} process(es))"
    else:
        graphs_why = "off (opt-in: runtime.cuda_graphs)"
    optimizers = getattr(request, "optimizers", "auto")
    if graphs:
        optim, optim_why = "foreach", "foreach: CUDA graphs need graph-capturable optimisers"
    elif optimizers == "auto":
        optim, optim_why = (
            "released",
            "released: the eager default (torch SGD/Adam, the duplicated list replayed in order)",
        )
    else:
        optim, optim_why = optimizers, "as requested"
    why = {
        "amp": amp_why,
        "channels_last": cl_why,
        "cuda_graphs": graphs_why,
        "optimizers": optim_why,
        "compile": "on as requested" if request.compile else "off (opt-in: runtime.compile)",
    }
    return Levers(amp, channels_last, graphs, bool(request.compile), optim, why)


def to_channels_last(*modules: nn.Module | None) -> None:
    """Convert the 4-d parameters and buffers of ``modules`` to channels_last, in place."""
    for m in modules:
        if m is not None:
            m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stub: no memory_format


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
        from torch._functorch import config as functorch_config  # noqa: PLC0415 - optional: private, absent on some builds

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except ImportError:  # older torch: no such optimisation
        pass
    for name in ("encoder", "tail", "classifier"):
        getattr(segmentor, name).compile(mode=mode, backend=backend)
    return segmentor
