"""The training engine: one build for train and bench, warm-up, corrector weighting,
self-training BatchNorm mode, fp16 gradient scaling, the source_only_bn control, levers."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import helpers
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from dast.benchmarking.modes import TrainingSetup, bench_config, bench_plan, build_nets, resolve_mode
from dast.cli import main
from dast.config import RuntimeConfig, deep_merge, from_tree
from dast.errors import NumericalFault, UserError
from dast.models import build_corrector, build_discoverer, build_segmentor
from dast.models.io import ModelSpec, Networks
from dast.progress import progress
from dast.training import levers
from dast.training.engine import Engine
from dast.training.levers import Levers, choose_levers
from dast.training.optim import discriminator_optimizer, segmentor_optimizer
from dast.training.plans import AdversarialWarmup, adversarial_warmup
from dast.training.runtime import Runtime
from dast.training.step import Batch, StepModels, compute_gradients
from dast.training.updates import ScaledUpdate, train_step

CPU = torch.device("cpu")


def _batch(classes: int = 3, h: int = 40, w: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(2, 3, h, w, generator=g)
    ys = torch.randint(0, classes, (2, h, w), generator=g)
    xt = torch.randn(2, 3, h, w, generator=g)
    return xs, ys, xt


def _nets(variant: str = "paper", classes: int = 3):
    torch.manual_seed(0)
    seg = build_segmentor("small", classes, variant)
    return seg, build_discoverer(seg.feature_channels), build_corrector(classes)


def _networks(variant: str = "paper", classes: int = 3) -> Networks:
    seg, d, c = _nets(variant, classes)
    return Networks(ModelSpec(arch="small", num_classes=classes, variant=variant), seg, d, c)


def _cfg(**sections):
    tree = deep_merge(copy.deepcopy(TINY), {"model": {"num_classes": 3}, **sections})
    return from_tree(tree, "test")


def _runtime(amp: torch.dtype | None = None, optimizers: str = "released") -> Runtime:
    return Runtime(CPU, Levers(amp, False, False, False, optimizers), deterministic=True)


# ---------------------------------------------------------------------------------------
# One engine for dast train and dast bench


@pytest.mark.parametrize(
    "mode, optimizers, want",
    [
        ("eager-fp32", "released", ("SequentialDuplicateSGD", "Adam")),
        ("fast-nograph", "foreach", ("ForeachSGD", "CapturableAdam")),
    ],
)
def test_bench_and_train_build_their_step_through_the_same_engine(
    tiny_config, tmp_path, monkeypatch, mode, optimizers, want
) -> None:
    built: list[Engine] = []
    original = Engine.build.__func__  # type: ignore[attr-defined]

    def spy(cls, *args, **kwargs):
        engine = original(cls, *args, **kwargs)
        built.append(engine)
        return engine

    monkeypatch.setattr(Engine, "build", classmethod(spy))
    cfg = tiny_config(
        variant="reference",
        selection={"enabled": False},
        val=None,
        train={"steps": 1},
        runtime={"device": "cpu", "amp": "none", "optimizers": optimizers},
    )
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    trained = built[-1]
    sched = {"train": {"lr": 0.01, "poly_steps": 100}}
    setup = TrainingSetup(resolve_mode(mode, CPU), build_nets("small", 7, "reference", seed=0), CPU, overrides=sched)
    bench = built[-1]
    assert setup.engine is bench
    assert (trained.describe()["segmentor_optimizer"], trained.describe()["discriminator_optimizer"]) == want
    assert trained.describe() == bench.describe()
    assert type(trained.update) is type(bench.update) and trained.update.name == "train_step"
    assert type(trained.ctx.settings) is type(bench.ctx.settings)


def test_bench_config_is_a_valid_training_config() -> None:
    mode = resolve_mode("eager-fp32", CPU)
    cfg = bench_config(mode, "reference", 19)
    assert cfg.runtime.optimizers == "released" and cfg.train.reuse_discoverer is False
    assert cfg.adversarial.corrector_weighting == "none"  # the release
    stage1 = bench_plan(cfg)
    assert stage1.index == 0 and stage1.duplicate_params and stage1.poly_steps == 250_000 and stage1.lr == 2.5e-4
    plan = bench_plan(cfg, stage=2)  # the released stage 2: one group, lr 2e-4, poly over 100k
    assert plan.index == 1 and plan.pseudo_labels and not plan.duplicate_params and plan.poly_steps == 100_000
    assert (plan.lr, plan.head_lr_mult) == (2e-4, 1.0)


def test_bench_plans_carry_the_run_directory_stage_names() -> None:
    # the benchmarks' STAGE1 schedule once shadowed the stage name imported from dast.rundir
    cfg = bench_config(resolve_mode("eager-fp32", CPU), "reference", 19)
    assert (bench_plan(cfg).name, bench_plan(cfg, stage=2).name) == ("stage1", "round1")


# ---------------------------------------------------------------------------------------
# Adversarial warm-up


def test_warmup_schedule_by_hand() -> None:
    w = AdversarialWarmup(start=3, ramp=4)
    assert [w.scale(i) for i in range(9)] == [0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [AdversarialWarmup(2, 0).scale(i) for i in range(4)] == [0, 0, 1.0, 1.0]
    assert [AdversarialWarmup(0, 2).scale(i) for i in range(3)] == [0.5, 1.0, 1.0]


def test_warmup_is_stage1_only_and_off_by_default() -> None:
    plan1 = helpers.plan("stage1", 0, 10)
    round1 = helpers.plan("round1", 1, 10)
    assert adversarial_warmup(_cfg(), plan1) is None
    cfg = _cfg(adversarial={"warmup_steps": 5, "warmup_ramp": 10})
    assert adversarial_warmup(cfg, plan1) == AdversarialWarmup(5, 10)
    assert adversarial_warmup(cfg, round1) is None


def _seg_grads(scale, settings=None):
    torch.set_default_dtype(torch.float64)
    try:
        seg, d, c = _nets()
        xs, ys, xt = (t.double() if t.is_floating_point() else t for t in _batch())
        so = segmentor_optimizer(
            seg, lr=0.01, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0, duplicate_params=False
        )
        do = discriminator_optimizer([d, c], 1e-4, (0.9, 0.99))
        s = settings or helpers.settings()
        out, _ = compute_gradients(
            helpers.context(StepModels(seg, d, c), so, do, s, contextlib.nullcontext),
            Batch(xs, ys, xt, None),
            adv_scale=scale,
        )
        return out, {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None}
    finally:
        torch.set_default_dtype(torch.float32)


def test_warmup_scale_multiplies_only_the_adversarial_gradient() -> None:
    _, full = _seg_grads(None)
    out_one, one = _seg_grads(1.0)
    _, half = _seg_grads(0.5)
    _, zero = _seg_grads(0.0)
    _, seg_only = _seg_grads(None, helpers.settings(adversarial=False, attention=False))
    for name in seg_only:
        assert torch.equal(full[name], one[name])
        torch.testing.assert_close(zero[name], seg_only[name], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(
            half[name] - seg_only[name], 0.5 * (full[name] - seg_only[name]), rtol=1e-9, atol=1e-13
        )
    assert "loss/adv_d" in out_one and "loss/adv_c" in out_one  # the logged losses stay unscaled


def test_warmup_shows_in_the_logged_scalars(tiny_config, tmp_path) -> None:
    cfg = tiny_config(
        selection={"enabled": False},
        val=None,
        train={"steps": 3, "log_every": 1},
        adversarial={"warmup_steps": 1, "warmup_ramp": 2},
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    got = [r["stage1/adversarial/warmup"] for r in rows if "stage1/adversarial/warmup" in r]
    assert got == [0.0, 0.5, 1.0]


# ---------------------------------------------------------------------------------------
# Corrector weighting: the segmentor's term and the corrector's own term


@pytest.mark.parametrize("weighting", ["none", "segmentor", "corrector", "both"])
def test_corrector_weighting_options_match_hand_derived_losses(weighting: str) -> None:
    torch.set_default_dtype(torch.float64)
    try:
        seg, d, c = _nets()
        xs, ys, xt = (t.double() if t.is_floating_point() else t for t in _batch())
        ref = copy.deepcopy((seg, d, c))
        so = segmentor_optimizer(
            seg, lr=0.01, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0, duplicate_params=False
        )
        do = discriminator_optimizer([d, c], 1e-4, (0.9, 0.99))
        settings = helpers.settings(
            weight_segmentor_adv=weighting in ("segmentor", "both"),
            weight_corrector_adv=weighting in ("corrector", "both"),
        )
        out, _ = compute_gradients(
            helpers.context(StepModels(seg, d, c), so, do, settings, contextlib.nullcontext), Batch(xs, ys, xt, None)
        )
        # by hand, on copies of the networks before the step
        rseg, rd, rc = ref
        with torch.no_grad():
            rseg(xs)  # the source forward moves the running statistics first, as in the step
            f_t = rseg.extract(xt)
            alpha = torch.abs(torch.tanh(rd(f_t)))
            logits = rseg.predict(f_t + f_t * alpha)
            p_t = F.softmax(F.interpolate(logits, size=xt.shape[-2:], mode="bilinear", align_corners=True), dim=1)
            c_t = rc(p_t)
            w = F.interpolate(alpha, size=c_t.shape[-2:], mode="bilinear", align_corners=True)
            plain_seg, weighted_seg = (c_t**2).mean(), (w * c_t**2).mean()
            plain_c, weighted_c = ((c_t - 1) ** 2).mean(), (w * (c_t - 1) ** 2).mean()
        want_seg = weighted_seg if settings.weight_segmentor_adv else plain_seg
        want_c = weighted_c if settings.weight_corrector_adv else plain_c
        assert out["loss/adv_c"].item() == pytest.approx(want_seg.item(), rel=1e-10)
        assert out["loss/c_target"].item() == pytest.approx(want_c.item(), rel=1e-10)
        assert (weighted_seg - plain_seg).abs() > 1e-6  # the weight really changes the loss
    finally:
        torch.set_default_dtype(torch.float32)


def test_weight_corrector_init_switch_sets_both_terms() -> None:
    s = helpers.settings(weight_corrector=True)
    assert s.weight_segmentor_adv and s.weight_corrector_adv
    assert not helpers.settings().weight_segmentor_adv


# ---------------------------------------------------------------------------------------
# Self-training BatchNorm mode


def _bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_reference_round_step_with_frozen_batchnorm_keeps_and_uses_the_running_statistics(batchnorm: str) -> None:
    cfg = _cfg(variant="reference")
    assert cfg.self_training.batchnorm == "frozen"  # the released stage 2
    nets = _networks("reference")
    xs, ys, xt = _batch()
    yt = torch.randint(0, 3, ys.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # give the running statistics non-trivial values first
        nets.segmentor.train()
        for _ in range(3):
            nets.segmentor(torch.randn(2, 3, 40, 48) * 3 + 1)
    before = _bn_stats(nets.segmentor)
    plan = helpers.plan("round1", 1, 5, lr=2e-4, head_lr_mult=1.0, batchnorm=batchnorm)
    engine = Engine.build(plan, cfg, nets, _runtime())
    engine.train_modes(nets.modules())
    assert all(not m.training for m in nets.modules()) == (batchnorm == "frozen")
    with torch.no_grad():  # what L_seg must be if the forward normalises with the running statistics
        ref = copy.deepcopy(nets.segmentor).eval()
        want = F.cross_entropy(F.interpolate(ref(xs), size=ys.shape[-2:], mode="bilinear", align_corners=True), ys)
    result = engine.step(0, Batch(xs, ys, xt, yt))
    assert result.applied
    after = _bn_stats(nets.segmentor)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    if batchnorm == "frozen":
        assert unchanged
        assert result.scalars["loss/seg"].item() == pytest.approx(want.item(), rel=1e-5)
    else:
        assert not unchanged
        assert result.scalars["loss/seg"].item() != pytest.approx(want.item(), rel=1e-3)


# ---------------------------------------------------------------------------------------
# The source_only_bn control


def test_forward_target_only_moves_batchnorm_statistics() -> None:
    results = []
    for forward_target in (False, True):
        seg, _, _ = _nets()
        so = segmentor_optimizer(
            seg, lr=0.01, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0, duplicate_params=False
        )
        xs, ys, xt = _batch()
        settings = helpers.settings(adversarial=False, attention=False, forward_target=forward_target)
        out, applied = train_step(
            helpers.context(StepModels(seg, None, None), so, None, settings, contextlib.nullcontext),
            Batch(xs, ys, xt, None),
        )
        assert applied and {k for k in out if k.startswith("loss/")} == {"loss/seg", "loss/total"}
        results.append(({n: p.detach().clone() for n, p in seg.named_parameters()}, _bn_stats(seg)))
    (w0, s0), (w1, s1) = results
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # same gradients: the target pass has no loss
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if "running_mean" in k)


# ---------------------------------------------------------------------------------------
# fp16: gradient scaling


def _engine_run(scaler: bool, steps: int = 3):
    cfg = _cfg()
    nets = _networks()
    plan = helpers.plan("stage1", 0, steps)
    engine = Engine.build(plan, cfg, nets, _runtime())
    if scaler:
        engine.update = ScaledUpdate(CPU)
        engine.update.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    engine.train_modes(nets.modules())
    xs, ys, xt = _batch()
    outs = [engine.step(i, Batch(xs, ys, xt, None)) for i in range(steps)]
    return engine, nets, outs


def test_gradient_scaling_in_fp32_gives_the_same_bits_as_no_scaling() -> None:
    # a power-of-two loss scale is exact in floating point: scaled-then-unscaled gradients
    # equal the plain ones, so the two paths must agree bit for bit
    _, plain, a = _engine_run(scaler=False)
    engine, scaled, b = _engine_run(scaler=True)
    assert all(r.applied for r in b) and engine.describe()["step_function"] == "train_step+GradScaler"
    for ra, rb in zip(a, b):
        assert all(torch.equal(ra.scalars[k], rb.scalars[k]) for k in ra.scalars)
    for m, n in zip(plain.modules(), scaled.modules()):
        for p, q in zip(m.parameters(), n.parameters()):
            assert torch.equal(p, q)


def test_fp16_builds_a_grad_scaler_that_skips_overflowing_steps() -> None:
    cfg = _cfg()
    nets = _networks()
    plan = helpers.plan("stage1", 0, 50)
    engine = Engine.build(plan, cfg, nets, _runtime(torch.float16))
    assert isinstance(engine.update, ScaledUpdate)
    assert engine.describe()["step_function"] == "train_step+GradScaler"
    engine.train_modes(nets.modules())
    xs, ys, xt = _batch()
    # fp16 gradients overflow at the initial scale (2^16): each such step is skipped and
    # halves the scale, until one is applied
    for i in range(40):
        scale = engine.update.scale
        result = engine.step(i, Batch(xs, ys, xt, None))
        if result.applied:
            break
        assert result.overflow  # finite losses: not a numerical fault
        assert engine.update.scale == scale / 2
    assert result.applied and not result.overflow and engine.update.scale < 2.0**16
    scale = engine.update.scale
    weights = [p.detach().clone() for p in nets.segmentor.parameters()]
    bad_xs = xs.clone()
    bad_xs[0, 0, 0, 0] = float("inf")
    bad = engine.step(i + 1, Batch(bad_xs, ys, xt, None))
    assert not bad.applied and not bad.overflow and engine.update.scale == scale / 2  # a real fault
    assert all(torch.equal(p, q) for p, q in zip(weights, nets.segmentor.parameters()))


def test_fp16_turns_cuda_graphs_off_and_says_why(monkeypatch) -> None:
    monkeypatch.setattr(levers, "device_capabilities", lambda device: levers.Capabilities("cuda", True, "sm90"))
    got = choose_levers(RuntimeConfig(amp="fp16", cuda_graphs=True), "cuda")
    assert got.amp_dtype == torch.float16 and not got.cuda_graphs
    assert "fp16 needs gradient scaling" in got.why["cuda_graphs"]
    bf16 = choose_levers(RuntimeConfig(amp="bf16", cuda_graphs=True), "cuda")
    assert bf16.amp_dtype == torch.bfloat16 and bf16.cuda_graphs


def test_fp16_is_refused_on_the_cpu_by_the_runtime() -> None:
    with pytest.raises(UserError, match="fp16' needs a CUDA device"):
        choose_levers(RuntimeConfig(amp="fp16"), "cpu")


# ---------------------------------------------------------------------------------------
# Levers per device


def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(
        levers, "device_capabilities", lambda device: levers.Capabilities("cpu", False, "CPU AVX2, no native bf16")
    )
    got = choose_levers(RuntimeConfig(amp="bf16", cuda_graphs=True), "cpu")
    assert got.amp_dtype is None and "slower than fp32" in got.why["amp"]
    assert not got.cuda_graphs and "needs a single CUDA device" in got.why["cuda_graphs"]
    assert got.optimizers == "released" and not got.channels_last
    monkeypatch.setattr(
        levers, "device_capabilities", lambda device: levers.Capabilities("cpu", True, "CPU AVX512, native bf16")
    )
    assert choose_levers(RuntimeConfig(amp="bf16"), "cpu").amp_dtype == torch.bfloat16
    assert choose_levers(RuntimeConfig(amp="auto"), "cpu").amp_dtype is None  # auto keeps fp32 on the CPU
    assert choose_levers(RuntimeConfig(optimizers="foreach"), "cpu").optimizers == "foreach"


def test_bench_rows_say_why_each_lever_is_on_or_off() -> None:
    row = resolve_mode("fast", CPU).describe()
    assert set(row["levers_why"]) == {"amp", "channels_last", "cuda_graphs", "compile", "optimizers"}
    assert "CUDA" in row["levers_why"]["cuda_graphs"]


# ---------------------------------------------------------------------------------------
# Progress reports


def test_progress_prints_lines_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    assert list(progress(range(20), total=20, desc="evaluating", stream=out)) == list(range(20))
    lines = out.getvalue().splitlines()
    assert (
        len(lines) == 10 and lines[0].startswith("evaluating: 2/20 img") and lines[-1].startswith("evaluating: 20/20")
    )
    quiet = io.StringIO()
    assert list(progress(range(3), total=3, desc="x", stream=quiet, enabled=False)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_the_fp16_update_stops_once_the_loss_scale_cannot_help(monkeypatch) -> None:
    """Overflowing gradients with finite losses halve the scale; below 2^-24 the run stops."""
    from dast.training import updates  # noqa: PLC0415 - patched below

    seg, d, c = _nets()
    so, do = (
        segmentor_optimizer(seg, lr=0.01, momentum=0.9, weight_decay=0.0, head_lr_mult=1.0, duplicate_params=False),
        None,
    )

    def overflowing(ctx, batch, adv_scale=None, *, loss_scale=None):
        loss_scale(torch.ones(()))  # as the real step scales each loss before its backward
        for p in seg.parameters():
            p.grad = torch.full_like(p, float("inf"))
        return {"loss/seg": torch.tensor(1.0)}, False

    monkeypatch.setattr(updates, "compute_gradients", overflowing)
    policy = ScaledUpdate(CPU)
    policy.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-23)
    ctx = helpers.context(StepModels(seg, d, c), so, do)
    xs, ys, xt = _batch()
    first = policy(ctx, Batch(xs, ys, xt), None)
    assert not first.applied and first.overflow and policy.scale == 2.0**-24  # 2^-24: still worth trying
    assert first.note == "fp16 gradients overflowed; skipped, loss scale now 5.96046e-08"
    with pytest.raises(NumericalFault, match=r"loss scale fell to 2.98023e-08 .*overflow at any scale"):
        policy(ctx, Batch(xs, ys, xt), None)
