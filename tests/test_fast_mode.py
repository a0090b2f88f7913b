"""Fast mode: same update rules as the eager path, bf16 within tolerance, CUDA paths guarded."""

from __future__ import annotations

import contextlib
import copy

import helpers
import pytest
import torch

from dast.benchmarking.agreement import LossTolerance, compare_losses, loss_history, pixel_agreement
from dast.benchmarking.modes import TrainingSetup, build_nets, resolve_mode
from dast.benchmarking.workloads import infer_fn
from dast.contexts import autocast_factory
from dast.data.synthetic import NUM_CLASSES, generate_scene
from dast.data.transforms import normalize
from dast.models.target_model import TargetModel
from dast.training.graphs import GraphedCallable, GraphedStep
from dast.training.levers import compile_segmentor, device_capabilities
from dast.training.optim import (
    CapturableAdam,
    ForeachSGD,
    OptimizerSettings,
    SequentialDuplicateSGD,
    build_optimizers,
    discriminator_optimizer,
    segmentor_optimizer,
)
from dast.training.step import Batch, StepModels, apply_updates, compute_gradients, losses_finite
from dast.training.updates import train_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _opt_settings(lr: float = 0.01, duplicate: bool = True) -> OptimizerSettings:
    return OptimizerSettings(
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        head_lr_mult=10.0,
        duplicate_params=duplicate,
        lr_d=1e-4,
        betas=(0.9, 0.99),
    )


def _nets(variant: str = "reference", classes: int = 4):
    return build_nets("small", classes, variant, seed=0)


def _batch(classes: int = 4, h: int = 40, w: int = 48):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(1, 3, h, w, generator=g)
    ys = torch.randint(0, classes, (1, h, w), generator=g)
    ys[0, :4] = 255
    xt = torch.randn(1, 3, h, w, generator=g)
    yt = torch.randint(0, classes, (1, h, w), generator=g)
    return xs, ys, xt, yt


def _toy_grads(seg, steps: int):
    """Deterministic gradients per step that do not depend on the weights."""
    g = torch.Generator().manual_seed(5)
    return [[torch.randn(p.shape, generator=g) for p in seg.parameters()] for _ in range(steps)]


def _run_sgd(seg, opt, grads, lrs):
    for step_grads, lr in zip(grads, lrs):
        for i, group in enumerate(opt.param_groups):
            group["lr"] = lr * (10.0 if i == 1 else 1.0)
        for p, g in zip(seg.parameters(), step_grads):
            p.grad = g.clone() if p.requires_grad else None
        opt.step()


# ---------------------------------------------------------------------------------------
# Optimisers


@pytest.mark.parametrize("duplicate", [True, False])
def test_foreach_sgd_gives_the_same_bits_as_the_eager_optimisers(duplicate: bool) -> None:
    seg, _, _ = _nets()
    a, b = copy.deepcopy(seg), copy.deepcopy(seg)
    ref = segmentor_optimizer(
        a, lr=0.01, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0, duplicate_params=duplicate
    )
    assert isinstance(ref, SequentialDuplicateSGD if duplicate else torch.optim.SGD)
    fast, _ = build_optimizers(b, [], _opt_settings(duplicate=duplicate), family="foreach", tensor_lr=False)
    grads = _toy_grads(seg, 4)
    lrs = [0.01, 0.008, 0.005, 0.002]
    _run_sgd(a, ref, grads, lrs)
    _run_sgd(b, fast, grads, lrs)
    moved = 0
    for (name, p), q, p0 in zip(a.named_parameters(), b.parameters(), seg.parameters()):
        assert torch.equal(p, q), name
        moved += int(not torch.equal(p, p0))
    assert moved > 10
    # the optimiser states are interchangeable (same keys, same values)
    sa, sb = ref.state_dict()["state"], fast.state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)


def test_foreach_sgd_duplicates_apply_k_sequential_updates_by_hand() -> None:
    p = torch.tensor([1.0, -2.0])
    q = p.clone().requires_grad_(True)
    opt = ForeachSGD([{"params": [q], "multiplicity": [3]}], lr=0.1, momentum=0.5, weight_decay=0.1)
    q.grad = torch.tensor([0.5, 0.25])
    opt.step()
    want, buf = p.clone(), torch.zeros(2)
    for _ in range(3):
        d = torch.tensor([0.5, 0.25]) + 0.1 * want
        buf = 0.5 * buf + d
        want = want - 0.1 * buf
    torch.testing.assert_close(q.detach(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[q]["momentum_buffer"], buf, rtol=1e-6, atol=1e-7)


def test_foreach_sgd_tensor_learning_rate_follows_param_groups() -> None:
    seg, _, _ = _nets()
    a, b = copy.deepcopy(seg), copy.deepcopy(seg)
    ref, _ = build_optimizers(a, [], _opt_settings(), family="foreach", tensor_lr=False)
    fast, _ = build_optimizers(b, [], _opt_settings(), family="foreach", tensor_lr=True)
    grads = _toy_grads(seg, 3)
    lrs = [0.01, 0.004, 0.001]
    _run_sgd(a, ref, grads, lrs)
    _run_sgd(b, fast, grads, lrs)
    assert [float(t) for t in fast._lr_tensors] == pytest.approx([0.001, 0.01])
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_capturable_adam_matches_torch_adam_and_shares_its_state_format() -> None:
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(30, 7, generator=g), torch.randn(11, generator=g)]
    a = [p.clone().requires_grad_(True) for p in ps]
    b = [p.clone().requires_grad_(True) for p in ps]
    ref = torch.optim.Adam(a, lr=1e-3, betas=(0.9, 0.99))
    fast = CapturableAdam(b, lr=1e-3, betas=(0.9, 0.99))
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        for opt, params in ((ref, a), (fast, b)):
            opt.param_groups[0]["lr"] = 1e-3 * (1 - step / 10)
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
    assert float(fast.state[b[0]]["step"]) == 6.0
    # a torch Adam checkpoint loads into CapturableAdam and continues identically (and back)
    fast2 = CapturableAdam(a, lr=1e-3, betas=(0.9, 0.99))
    fast2.load_state_dict(ref.state_dict())
    assert set(fast2.state[a[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.optim.Adam(b, lr=1e-3, betas=(0.9, 0.99)).load_state_dict(fast.state_dict())


# ---------------------------------------------------------------------------------------
# The eager path


@pytest.mark.parametrize("reuse", [False, True])
def test_train_step_is_exactly_its_phases(reuse: bool) -> None:
    """train_step = compute_gradients + finiteness flag + apply_updates, bit for bit."""
    xs, ys, xt, yt = _batch()
    results = []
    for split in (False, True):
        seg, d, c = _nets()
        so = segmentor_optimizer(
            seg, lr=0.01, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0, duplicate_params=True
        )
        do = discriminator_optimizer([d, c], 1e-3, (0.9, 0.99))
        models, settings = StepModels(seg, d, c), helpers.settings(reuse_discoverer=reuse)
        outs = []
        for i in range(2):
            if split:
                ctx = helpers.context(models, so, do, settings, contextlib.nullcontext)
                out, active = compute_gradients(ctx, Batch(xs, ys, xt, yt if i else None))
                assert bool(losses_finite(out)) and active
                apply_updates(ctx, active)
            else:
                out, applied = train_step(
                    helpers.context(models, so, do, settings, contextlib.nullcontext),
                    Batch(xs, ys, xt, yt if i else None),
                )
                assert applied
            outs.append(out)
        results.append((outs, [p.detach().clone() for m in (seg, d, c) for p in m.parameters()]))
    (oa, pa), (ob, pb) = results
    for x, y in zip(oa, ob):
        assert list(x) == list(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))


def test_eager_fp32_mode_is_the_default_fp32_train_step_bit_for_bit() -> None:
    """The benchmark's baseline runs exactly what the trainer's default fp32 path runs."""
    xs, ys, xt, _ = _batch()
    sched = {"train": {"lr": 0.01, "poly_steps": 100}, "adversarial": {"lr": 1e-3}}
    setup = TrainingSetup(
        resolve_mode("eager-fp32", torch.device("cpu")), _nets(), torch.device("cpu"), overrides=sched
    )
    seg, d, c = _nets()
    so = segmentor_optimizer(seg, lr=0.01, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0, duplicate_params=True)
    do = discriminator_optimizer([d, c], 1e-3, (0.9, 0.99))
    for i in range(3):
        out_a, _ = setup.step(i, xs, ys, xt, None)
        lr = 0.01 * (1 - i / 100) ** 0.9
        so.param_groups[0]["lr"], so.param_groups[1]["lr"] = lr, 10 * lr
        do.param_groups[0]["lr"] = 1e-3 * (1 - i / 100) ** 0.9
        out_b, _ = train_step(
            helpers.context(
                StepModels(seg, d, c), so, do, helpers.settings(reuse_discoverer=False), contextlib.nullcontext
            ),
            Batch(xs, ys, xt, None),
        )
        assert all(torch.equal(out_a[k], out_b[k]) for k in out_b)
    for p, q in zip(setup.segmentor.parameters(), seg.parameters()):
        assert torch.equal(p, q)


def test_fast_mode_levers_on_cpu() -> None:
    # bf16 only where this CPU computes it natively (emulated bf16 is slower than fp32)
    native = device_capabilities("cpu").native_bf16
    mode = resolve_mode("fast", torch.device("cpu"))
    why = mode.describe().pop("levers_why")
    assert {k: v for k, v in mode.describe().items() if k != "levers_why"} == {
        "channels_last": False,
        "reuse_discoverer": True,
        "optimizers": "foreach",
        "cuda_graph": False,
        "compile": False,
        "amp": "bf16" if native else "none",
    }
    assert set(why) == {"amp", "channels_last", "cuda_graphs", "compile", "optimizers"}


def test_cuda_graph_helpers_refuse_cpu_tensors() -> None:
    seg, d, c = _nets()
    so, do = build_optimizers(seg, [d, c], _opt_settings(), family="foreach", tensor_lr=True)
    with pytest.raises(RuntimeError, match="needs a model on CUDA"):
        GraphedStep(helpers.context(StepModels(seg, d, c), so, do))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        GraphedCallable(lambda x: x * 2)(torch.zeros(2))


def test_compiled_segmentor_keeps_state_dict_keys_and_outputs() -> None:
    seg, _, _ = _nets()
    ref = copy.deepcopy(seg).eval()
    keys = list(seg.state_dict())
    compile_segmentor(seg, backend="eager").eval()
    assert list(seg.state_dict()) == keys
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(seg.predict(seg.extract(x)), ref.predict(ref.extract(x)))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# bf16 on the CPU: losses and predictions within the documented tolerance


def _scenes(domain: str, n: int, size: tuple[int, int]):
    pairs = [generate_scene(domain, i, 0, size) for i in range(n)]
    x = torch.stack([normalize(img, "imagenet") for img, _ in pairs])
    y = torch.stack([torch.from_numpy(lab.astype("int64")) for _, lab in pairs])
    return x, y


def test_cpu_fast_mode_tracks_eager_fp32_within_tolerance() -> None:
    dev = torch.device("cpu")
    xs, ys = _scenes("source", 4, (96, 64))
    xt, _ = _scenes("target", 4, (96, 64))

    sched = {"train": {"poly_steps": 1000}}  # the released learning rates
    nets = build_nets("small", NUM_CLASSES, "reference", seed=0)
    runs = {}
    for name in ("eager-fp32", "fast"):
        setup = TrainingSetup(resolve_mode(name, dev), copy.deepcopy(nets), dev, overrides=sched)
        outs = []
        for i in range(12):
            out, applied = setup.step(i, xs[i % 4 : i % 4 + 1], ys[i % 4 : i % 4 + 1], xt[i % 4 : i % 4 + 1], None)
            assert applied
            outs.append(out)
        runs[name] = (setup, loss_history(outs))
    report = compare_losses(runs["eager-fp32"][1], runs["fast"][1], LossTolerance(window=4))
    assert set(report) >= {"loss/seg", "loss/adv_d", "loss/adv_c", "loss/disc", "loss/d_target"}
    assert all(r["pass"] for r in report.values()), report
    if device_capabilities(dev).native_bf16:
        assert report["loss/seg"]["first_rel_diff"] > 0  # bf16 really ran (only where it is native)
    # inference from the fp32-trained weights: the shipped fast inference (fp32 on the CPU)
    # agrees on >= 99.5% of the pixels; opt-in bf16 stays close on this barely trained net
    eager = runs["eager-fp32"][0]
    model = TargetModel(eager.segmentor, eager.discoverer).eval()
    want = infer_fn(model, resolve_mode("eager-fp32", dev), dev, (192, 128))(xt)
    assert want.shape == (4, 128, 192) and want.dtype == torch.uint8
    assert pixel_agreement(want, infer_fn(model, resolve_mode("fast-fp32", dev), dev, (192, 128))(xt)) >= 0.995
    assert pixel_agreement(want, infer_fn(model, resolve_mode("fast", dev), dev, (192, 128))(xt)) >= 0.98


def test_compare_losses_rules_by_hand() -> None:
    eager = {"loss/a": [1.0, 1.0, 1.0, 1.0], "loss/b": [0.01, 0.01]}
    fast = {"loss/a": [1.01, 1.0, 1.3, 1.3], "loss/b": [0.02, 0.02]}
    r = compare_losses(eager, fast, LossTolerance(first_rtol=0.02, window=2, window_rtol=0.1, atol_floor=0.05))
    assert r["loss/a"]["first_rel_diff"] == pytest.approx(0.01)
    assert r["loss/a"]["max_window_rel_diff"] == pytest.approx(0.3)
    assert not r["loss/a"]["pass"]
    assert r["loss/b"]["first_rel_diff"] == pytest.approx(0.2)  # |0.01 - 0.02| / floor 0.05
    assert not r["loss/b"]["pass"]
    assert compare_losses({"loss/a": [1.0]}, {}, LossTolerance())["loss/a"]["pass"] is False
    # a control run that itself drifts by 0.2 allows up to 3 x 0.2 (but not the first step)
    control = {"loss/a": [1.0, 1.0, 1.2, 1.2], "loss/b": [0.01, 0.01]}
    r = compare_losses(eager, fast, LossTolerance(window=2, control_factor=3.0), control)
    assert r["loss/a"]["control_max_window_rel_diff"] == pytest.approx(0.2)
    assert r["loss/a"]["allowed_window_rel_diff"] == pytest.approx(0.6)
    assert r["loss/a"]["pass"]
    assert not r["loss/b"]["pass"]  # its first step is 20% off


# ---------------------------------------------------------------------------------------
# CUDA only


def _cuda_setup(graph: bool, amp: torch.dtype | None = None, lr: float = 1e-3):
    dev = torch.device("cuda")
    seg, d, c = (m.to(dev) for m in _nets())
    so, do = build_optimizers(seg, [d, c], _opt_settings(lr=lr), family="foreach", tensor_lr=True)
    models = StepModels(seg, d, c)
    ctx = helpers.context(models, so, do, helpers.settings(reuse_discoverer=True), autocast_factory(dev, amp))
    if graph:
        return models, so, do, GraphedStep(ctx, warmup=2)
    return models, so, do, lambda batch: train_step(ctx, batch)


@pytest.fixture()
def cudnn_deterministic():
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


@cuda
def test_graphed_step_matches_the_eager_step_on_cuda(cudnn_deterministic) -> None:
    xs, ys, xt, yt = (t.cuda() for t in _batch())
    runs = []
    for graph in (False, True):
        models, so, _, step = _cuda_setup(graph)
        outs = []
        for i in range(6):
            so.param_groups[0]["lr"] = 1e-3 / (i + 1)  # the schedule reaches the captured step
            out, applied = step(Batch(xs, ys, xt, None))
            assert applied
            outs.append({k: float(v) for k, v in out.items()})
        runs.append((outs, [p.detach().clone() for p in models.segmentor.parameters()]))
        if graph:
            assert step.captured and step.calls == 6
    (oa, pa), (ob, pb) = runs
    for x, y in zip(oa, ob):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-3, abs=1e-5), k
    for p, q in zip(pa, pb):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5)


@cuda
def test_graphed_step_skips_non_finite_updates_on_cuda() -> None:
    xs, ys, xt, _ = (t.cuda() for t in _batch())
    models, so, do, step = _cuda_setup(True)
    for _ in range(4):
        assert step(Batch(xs, ys, xt, None))[1]
    assert step.captured
    before = [p.detach().clone() for p in models.segmentor.parameters()]
    out, applied = step(Batch(xs * float("nan"), ys, xt, None))
    assert not applied and not torch.isfinite(out["loss/seg"])
    assert all(torch.equal(p, q) for p, q in zip(before, models.segmentor.parameters()))
    assert step(Batch(xs, ys, xt, None))[1]
    assert any(not torch.equal(p, q) for p, q in zip(before, models.segmentor.parameters()))
    with pytest.raises(RuntimeError, match="built without target labels"):
        step(Batch(xs, ys, xt, ys))


@cuda
def test_graphed_bf16_step_and_graphed_inference_run_on_cuda() -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    xs, ys, xt, yt = (t.cuda() for t in _batch())
    models, _, _, step = _cuda_setup(True, torch.bfloat16)
    for _ in range(5):
        out, applied = step(Batch(xs, ys, xt, yt))
        assert applied and torch.isfinite(out["loss/total"]) and "loss/pseudo_seg" in out
    model = TargetModel(models.segmentor, models.discoverer).eval()
    dev = torch.device("cuda")
    want = infer_fn(model, resolve_mode("eager-fp32", dev), dev, (96, 80))(xt).clone()
    for name, floor in (("fast-fp32", 0.999), ("fast", 0.9)):
        graphed = infer_fn(model, resolve_mode(name, dev), dev, (96, 80))
        assert isinstance(graphed, GraphedCallable)
        for _ in range(4):  # two eager warm-up calls, the capture, one replay
            got = graphed(xt).clone()
        assert graphed.calls == 4
        assert pixel_agreement(want, got) >= floor, name


@cuda
def test_compiled_segmentor_runs_on_cuda() -> None:
    seg, _, _ = _nets()
    seg = seg.cuda().eval()
    keys = list(seg.state_dict())
    ref = copy.deepcopy(seg)
    compile_segmentor(seg)
    x = torch.randn(1, 3, 64, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(seg(x), ref(x), rtol=1e-2, atol=1e-2)
    assert list(seg.state_dict()) == keys
    torch._dynamo.reset()
