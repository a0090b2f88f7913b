"""The measured workloads: stage-1 and stage-2 iterations, target inference, pseudo labels.

Every measurement builds its networks from the same seed (random weights: the timing
does not depend on them), runs ``warmup`` untimed iterations and then times ``iters``
iterations with a device synchronisation after each. Data loading is not included
(the inputs sit on the device), as in the released code's GPU-side work.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from dast.benchmarking.modes import ONLINE_STAGE, ResolvedMode, TrainingSetup, build_nets, resolve_mode
from dast.benchmarking.timing import Timing, device_name, measure, peak_memory_gib, reset_peak_memory, rss_gib
from dast.losses import spatial_size, upsample
from dast.models.target_model import TargetModel
from dast.training.graphs import GraphedCallable
from dast.training.levers import compile_segmentor, to_channels_last

WHATS = ("step", "step2", "step_online", "infer", "pseudo")
STEPS = {"step": 1, "step2": 2, "step_online": ONLINE_STAGE}  # what -> TrainingSetup stage
NUM_CLASSES = 19


@dataclass(frozen=True)
class Sizes:
    """Input sizes as (width, height)."""

    source: tuple[int, int]
    target: tuple[int, int]
    infer_out: tuple[int, int]


SIZES = {
    "paper": Sizes((1280, 720), (1024, 512), (2048, 1024)),
    "small": Sizes((256, 144), (256, 128), (512, 256)),
}


def random_images(batch: int, size: tuple[int, int], gen: torch.Generator) -> Tensor:
    w, h = size
    return torch.randn(batch, 3, h, w, generator=gen)


def random_labels(batch: int, size: tuple[int, int], num_classes: int, gen: torch.Generator) -> Tensor:
    """Class indices with the top eighth of the rows ignored (255)."""
    w, h = size
    labels = torch.randint(0, num_classes, (batch, h, w), generator=gen)
    labels[:, : max(h // 8, 1)] = 255
    return labels


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass
class Case:
    """One prepared measurement: ``fn(i)`` runs iteration ``i``; ``info()`` adds row fields."""

    fn: Callable[[int], Any]
    warmup: int
    info: Callable[[], dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One measured (what, arch, batch) besides the mode: its device, sizes, warm-up
    iterations, network variant and class count."""

    what: str
    arch: str
    device: torch.device
    sizes: Sizes
    batch: int = 1
    warmup: int = 3
    variant: str = "reference"
    num_classes: int = NUM_CLASSES


@dataclass(frozen=True, kw_only=True)
class BenchRequest:
    """What ``dast bench`` measures: every (what, arch, batch) for every mode.
    ``interleave`` None: on the CPU only (see :func:`measure_modes`)."""

    device: torch.device
    archs: Sequence[str]
    size: str
    whats: Sequence[str]
    modes: Sequence[str]
    iters: int
    warmup: int
    batches: Sequence[int]
    variant: str = "reference"
    num_classes: int = NUM_CLASSES
    interleave: bool | None = None


def prepare_step(work: Workload, mode: ResolvedMode) -> Case:
    """One training iteration (batch 1 source + 1 target; ``step2`` adds target pseudo labels;
    ``step_online`` is the online stage's: teacher, ClassMix, strong augmentation, EMA)."""
    w, sizes, num_classes, warmup = work, work.sizes, work.num_classes, work.warmup
    stage = STEPS[w.what]
    nets = build_nets(w.arch, num_classes, w.variant, seed=0)
    setup = TrainingSetup(mode, nets, w.device, stage=stage, variant=w.variant, arch=w.arch)
    gen = torch.Generator().manual_seed(1)
    xs = setup.prepare_images(random_images(1, sizes.source, gen))
    ys = random_labels(1, sizes.source, num_classes, gen).to(w.device)
    xt = setup.prepare_images(random_images(1, sizes.target, gen))
    yt = random_labels(1, sizes.target, num_classes, gen).to(w.device) if w.what == "step2" else None
    applied: list[bool] = []
    last: dict[str, Tensor] = {}

    def one(i: int) -> None:
        out, ok = setup.step(i, xs, ys, xt, yt)
        applied.append(ok)
        last["loss/seg"] = out["loss/seg"]

    if setup.graphed is not None:
        warmup = max(warmup, setup.graphed.warmup + 2)  # eager warm-up calls, capture, one replay

    def info() -> dict[str, Any]:
        return {
            "batch": 1,
            "applied_fraction": round(sum(applied) / max(len(applied), 1), 3),
            "last_loss_seg": round(float(last["loss/seg"]), 5) if last else None,
            "source_size": list(sizes.source),
            "target_size": list(sizes.target),
        }

    return Case(one, warmup, info)


def _target_model(work: Workload, mode: ResolvedMode) -> TargetModel:
    seg, disc, _ = build_nets(work.arch, work.num_classes, work.variant, seed=0)
    model = TargetModel(seg, disc).to(work.device).eval()
    if mode.channels_last:
        to_channels_last(model)
    if mode.compile:
        compile_segmentor(seg)
    return model


def _graphed(fn: Callable[[Tensor], Any], mode: ResolvedMode) -> Callable[[Tensor], Any]:
    return GraphedCallable(fn) if mode.cuda_graph else fn


def _images(batch: int, size: tuple[int, int], mode: ResolvedMode, device: torch.device) -> Tensor:
    x = random_images(batch, size, torch.Generator().manual_seed(2)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if mode.channels_last else x


def infer_fn(
    model: TargetModel, mode: ResolvedMode, device: torch.device, out_size: tuple[int, int]
) -> Callable[[Tensor], Tensor]:
    """Images -> uint8 class maps at ``out_size`` (w, h): the target path, logits upsampled
    bilinearly (align_corners) and argmax, as in the evaluation."""
    autocast = mode.autocast(device)
    w, h = out_size

    def fn(x: Tensor) -> Tensor:
        with torch.no_grad():
            with autocast():
                logits, _ = model(x)
            return upsample(logits.float(), (h, w)).argmax(1).to(torch.uint8)

    return _graphed(fn, mode)


def probability_fn(model: TargetModel, mode: ResolvedMode, device: torch.device) -> Callable[[Tensor], Tensor]:
    """Images -> softmax of the target logits upsampled to the input size (the pseudo-label input)."""
    autocast = mode.autocast(device)

    def fn(x: Tensor) -> Tensor:
        with torch.no_grad():
            with autocast():
                logits, _ = model(x)
            return torch.softmax(upsample(logits.float(), spatial_size(x)), dim=1)

    return _graphed(fn, mode)


def _graph_warmup(mode: ResolvedMode, warmup: int) -> int:
    return max(warmup, 4) if mode.cuda_graph else warmup


def prepare_infer(work: Workload, mode: ResolvedMode) -> Case:
    """Target inference at the target size, upsampled to ``sizes.infer_out``, argmax on the device."""
    sizes, batch = work.sizes, work.batch
    model = _target_model(work, mode)
    fn = infer_fn(model, mode, work.device, sizes.infer_out)
    x = _images(batch, sizes.target, mode, work.device)
    return Case(
        lambda i: fn(x),
        _graph_warmup(mode, work.warmup),
        lambda: {"batch": batch, "input_size": list(sizes.target), "output_size": list(sizes.infer_out)},
    )


def prepare_pseudo(work: Workload, mode: ResolvedMode) -> Case:
    """Pseudo-label work per batch, as ``generate_pseudo_labels`` in histogram mode does it:
    pass 1 (probabilities, histogram update) and pass 2 (probabilities, label selection,
    copy to the host). PNG encoding and disk writes are not included."""
    from dast.training.pseudo_labels import ThresholdEstimator, select_labels  # noqa: PLC0415 - lazy: keeps dast --help fast

    device, sizes, batch, num_classes = work.device, work.sizes, work.batch, work.num_classes
    model = _target_model(work, mode)
    probs = probability_fn(model, mode, device)
    est = ThresholdEstimator(num_classes, portion=0.5, mode="histogram", device=device)
    thresholds = torch.full((num_classes,), 0.5, device=device)
    x = _images(batch, sizes.target, mode, device)

    def run(i: int) -> None:
        est.update(probs(x))
        select_labels(probs(x), thresholds).cpu()

    return Case(
        run,
        _graph_warmup(mode, work.warmup),
        lambda: {"batch": batch, "input_size": list(sizes.target), "forward_passes_per_image": 2},
    )


def prepare(work: Workload, mode: ResolvedMode) -> Case:
    """The :class:`Case` of one measurement."""
    if work.what in STEPS:
        return prepare_step(work, mode)
    if work.what == "infer":
        return prepare_infer(work, mode)
    if work.what == "pseudo":
        return prepare_pseudo(work, mode)
    raise ValueError(f"unknown workload {work.what!r}")


def _result(timing: Timing, case: Case, warmup: int, mode: ResolvedMode, device: torch.device) -> dict[str, Any]:
    row = {
        **timing.summary(),
        "warmup": warmup,
        "peak_mem_gib": peak_memory_gib(device),
        "rss_gib": rss_gib(),
        **mode.describe(),
        **case.info(),
    }
    if "input_size" in row:
        row["images_per_s"] = round(row["batch"] * 1000.0 / timing.median, 2)
    return row


def _error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:500]


def _call_at(case: Case, offset: int, i: int) -> Any:
    """``case.fn`` at call index ``case.warmup + offset + i`` (the interleaved timing's count)."""
    return case.fn(case.warmup + offset + i)


def measure_modes(work: Workload, modes: Sequence[str], *, iters: int, interleave: bool) -> list[dict[str, Any] | str]:
    """Time every mode of one (what, arch, batch); a result row, or an error string, per mode.

    Sequential: each mode is built, warmed up, timed and freed in turn (peak memory is
    per mode). Interleaved: all modes are built and warmed up, then timed round-robin
    one iteration at a time, so that a shared machine's load affects them alike (peak
    memory then covers all modes).
    """
    device = work.device
    results: list[dict[str, Any] | str] = []
    case: Case | None = None
    if not interleave:
        for name in modes:
            mode = resolve_mode(name, device)
            try:
                reset_peak_memory(device)
                case = prepare(work, mode)
                timing = measure(case.fn, iters=iters, warmup=case.warmup, device=device)
                results.append(_result(timing, case, case.warmup, mode, device))
            except Exception as exc:  # noqa: BLE001 - report and go on with the next measurement
                results.append(_error(exc))
            case = None
            _cleanup(device)
        return results
    reset_peak_memory(device)
    cases: list[Case | str] = []
    for name in modes:
        try:
            case = prepare(work, resolve_mode(name, device))
            for i in range(case.warmup):
                case.fn(i)
            cases.append(case)
        except Exception as exc:  # noqa: BLE001 - an error row for this mode; the others go on
            cases.append(_error(exc))
    times: list[list[float]] = [[] for _ in cases]
    for it in range(iters):
        for k, entry in enumerate(cases):
            if isinstance(entry, str):
                continue
            try:
                times[k].extend(measure(partial(_call_at, entry, it), iters=1, warmup=0, device=device).times_ms)
            except Exception as exc:  # noqa: BLE001 - an error row for this mode; the others go on
                cases[k] = _error(exc)
    for name, entry, ts in zip(modes, cases, times):
        mode = resolve_mode(name, device)
        results.append(entry if isinstance(entry, str) else _result(Timing(ts), entry, entry.warmup, mode, device))
    cases.clear()
    _cleanup(device)
    return results


def run_benchmarks(request: BenchRequest) -> Iterator[dict[str, Any]]:
    """Yield one result row per (what, arch, batch, mode); a failing measurement yields a
    row with ``error`` instead of timings and the others still run. ``request.interleave``
    (default: on the CPU only) times the modes round-robin, see :func:`measure_modes`."""
    r = request
    device, modes, variant, num_classes = r.device, list(r.modes), r.variant, r.num_classes
    interleave = r.interleave
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if interleave is None:
        interleave = device.type == "cpu"
    sizes = SIZES[r.size]
    base = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "size": r.size,
        "variant": variant,
        "num_classes": num_classes,
        "interleaved": interleave,
        "tf32": bool(device.type == "cuda" and torch.backends.cudnn.allow_tf32),
    }
    for what in r.whats:
        for arch in r.archs:
            for batch in [1] if what in STEPS else list(r.batches):
                work = Workload(
                    what=what,
                    arch=arch,
                    device=device,
                    sizes=sizes,
                    batch=batch,
                    warmup=r.warmup,
                    variant=variant,
                    num_classes=num_classes,
                )
                results = measure_modes(work, modes, iters=r.iters, interleave=interleave)
                baseline: float | None = None
                for name, result in zip(modes, results):
                    row: dict[str, Any] = {"what": what, "arch": arch, "mode": name, **base}
                    if isinstance(result, str):
                        row.update(batch=batch, error=result, **resolve_mode(name, device).describe())
                        yield row
                        continue
                    row.update(result)
                    if name == "eager-fp32":
                        baseline = result["ms_median"]
                    elif baseline:
                        row["speedup_vs_eager_fp32"] = round(baseline / result["ms_median"], 3)
                    yield row
