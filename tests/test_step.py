"""One DAST iteration: the released update rule by hand, and D(f_t) reuse."""

from __future__ import annotations

import contextlib
import copy

import helpers
import pytest
import torch
import torch.nn.functional as F

from dast.models import build_corrector, build_discoverer, build_segmentor
from dast.training.optim import discriminator_optimizer, segmentor_optimizer
from dast.training.step import Batch, StepModels
from dast.training.updates import train_step

LR, LR_D, MOM, WD = 0.01, 1e-3, 0.9, 5e-4


@pytest.fixture()
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _nets(variant: str = "reference"):
    torch.manual_seed(0)
    seg = build_segmentor("small", 3, variant)
    return seg, build_discoverer(seg.feature_channels), build_corrector(3)


def _data():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(1, 3, 40, 48, generator=g)
    ys = torch.randint(0, 3, (1, 40, 48), generator=g)
    ys[0, :5] = 255
    xt = torch.randn(1, 3, 40, 48, generator=g)
    return xs, ys, xt


def _released_iteration(seg, D, C, xs, ys, xt):
    """The released DA_train.py iteration, written out independently of dast.training."""
    for p in list(D.parameters()) + list(C.parameters()):
        p.requires_grad = False
    f_s = seg.encoder(xs)
    pred_s = seg.classifier(seg.tail(f_s))
    pred_s = F.interpolate(pred_s, size=ys.shape[-2:], mode="bilinear", align_corners=True)
    loss_seg = F.cross_entropy(pred_s, ys, ignore_index=255)
    loss_seg.backward()
    f_t = seg.encoder(xt)
    a = torch.abs(torch.tanh(D(f_t)))
    pred_t = seg.classifier(seg.tail(a.expand(f_t.size()) * f_t + f_t))
    pred_t = F.interpolate(pred_t, size=xt.shape[-2:], mode="bilinear", align_corners=True)
    d_out = D(f_t)
    c_out = C(F.softmax(pred_t, dim=1))
    loss_adv = (F.mse_loss(d_out, torch.zeros_like(d_out)) + F.mse_loss(c_out, torch.zeros_like(c_out))) * 0.01
    loss_adv.backward()
    seg_grads = {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None}
    for p in list(D.parameters()) + list(C.parameters()):
        p.requires_grad = True
    ds = D(f_s.detach())
    cs = C(F.softmax(pred_s.detach(), dim=1))
    loss_d_src = F.mse_loss(ds, torch.zeros_like(ds)) + F.mse_loss(cs, torch.zeros_like(cs))
    loss_d_src.backward()
    dt = D(f_t.detach())
    ct = C(F.softmax(pred_t.detach(), dim=1))
    loss_d_tgt = F.mse_loss(dt, torch.ones_like(dt)) + F.mse_loss(ct, torch.ones_like(ct))
    loss_d_tgt.backward()
    disc_grads = {("D", n): p.grad.clone() for n, p in D.named_parameters()}
    disc_grads.update({("C", n): p.grad.clone() for n, p in C.named_parameters()})
    losses = {"seg": loss_seg.item(), "adv": loss_adv.item(), "d_src": loss_d_src.item(), "d_tgt": loss_d_tgt.item()}
    return losses, seg_grads, disc_grads


def _multiplicity(name: str) -> int:
    """The released generator's count, derived from the module path by hand."""
    if name.startswith("classifier."):
        return 1
    if name.startswith(("encoder.conv1.", "encoder.bn1.")):
        return 1  # a top-level stage that is itself the module
    if ".downsample." in name:
        return 4  # stage, block, shortcut Sequential, conv
    return 3  # stage, block, conv


def _sgd_by_hand(p: torch.Tensor, g: torch.Tensor, k: int, lr: float) -> torch.Tensor:
    buf = None
    for _ in range(k):
        d = g + WD * p
        buf = d if buf is None else MOM * buf + d
        p = p - lr * buf
    return p


def _adam_first_step(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    b1, b2, eps = 0.9, 0.99, 1e-8
    m, v = (1 - b1) * g, (1 - b2) * g * g
    return p - LR_D * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)


@pytest.mark.parametrize("reuse", [False, True])
def test_reference_iteration_matches_released_update_rule(f64, reuse: bool) -> None:
    seg, D, C = _nets("reference")
    xs, ys, xt = _data()
    ref_seg, ref_D, ref_C = copy.deepcopy(seg), copy.deepcopy(D), copy.deepcopy(C)
    losses, seg_grads, disc_grads = _released_iteration(ref_seg, ref_D, ref_C, xs, ys, xt)

    so = segmentor_optimizer(seg, lr=LR, momentum=MOM, weight_decay=WD, head_lr_mult=10.0, duplicate_params=True)
    do = discriminator_optimizer([D, C], LR_D, (0.9, 0.99))
    settings = helpers.settings(
        adv_loss="lsgan", lambda_d=0.01, lambda_c=0.01, attention=True, weight_corrector=False, reuse_discoverer=reuse
    )
    out, applied = train_step(
        helpers.context(StepModels(seg, D, C), so, do, settings, contextlib.nullcontext), Batch(xs, ys, xt, None)
    )
    assert applied
    assert out["loss/seg"].item() == pytest.approx(losses["seg"], rel=1e-12)
    assert (out["loss/adv_d"] * 0.01 + out["loss/adv_c"] * 0.01).item() == pytest.approx(losses["adv"], rel=1e-10)
    assert (out["loss/d_source"] + out["loss/c_source"]).item() == pytest.approx(losses["d_src"], rel=1e-12)
    assert (out["loss/d_target"] + out["loss/c_target"]).item() == pytest.approx(losses["d_tgt"], rel=1e-10)

    before = dict(ref_seg.named_parameters())
    checked = 0
    for name, p in seg.named_parameters():
        if name not in seg_grads:
            # frozen, or one of the two ASPP branches the released forward never sums
            assert not p.requires_grad or name.startswith(("classifier.conv2d_list.2", "classifier.conv2d_list.3"))
            assert torch.equal(p.detach(), before[name].detach())
            continue
        lr = LR * (10.0 if name.startswith("classifier.") else 1.0)
        want = _sgd_by_hand(before[name].detach(), seg_grads[name], _multiplicity(name), lr)
        torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked == sum(1 for p in seg.parameters() if p.requires_grad) - 4
    for tag, module, ref in (("D", D, ref_D), ("C", C, ref_C)):
        for (name, p), p0 in zip(module.named_parameters(), ref.parameters()):
            want = _adam_first_step(p0.detach(), disc_grads[(tag, name)])
            torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12)


def test_reusing_discoverer_output_is_identical_to_recomputing(f64) -> None:
    results = []
    for reuse in (False, True):
        seg, D, C = _nets("paper")
        xs, ys, xt = _data()
        so = segmentor_optimizer(seg, lr=LR, momentum=MOM, weight_decay=WD, head_lr_mult=10.0, duplicate_params=False)
        do = discriminator_optimizer([D, C], LR_D, (0.9, 0.99))
        settings = helpers.settings(weight_corrector=True, reuse_discoverer=reuse)
        outs = []
        for _ in range(3):
            out, _ = train_step(
                helpers.context(StepModels(seg, D, C), so, do, settings, contextlib.nullcontext),
                Batch(xs, ys, xt, None),
            )
            outs.append({k: v.item() for k, v in out.items()})
        results.append((outs, [copy.deepcopy(m.state_dict()) for m in (seg, D, C)]))
    (o1, w1), (o2, w2) = results
    for a, b in zip(o1, o2):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-11, abs=1e-14), k
    for sa, sb in zip(w1, w2):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-10, atol=1e-13)


def test_non_finite_loss_skips_the_update() -> None:
    seg, D, C = _nets("paper")
    xs, ys, xt = _data()
    xs, xt = xs.float(), xt.float()
    xs[0, 0, 0, 0] = float("nan")
    so = segmentor_optimizer(seg, lr=LR, momentum=MOM, weight_decay=WD, head_lr_mult=10.0, duplicate_params=False)
    do = discriminator_optimizer([D, C], LR_D, (0.9, 0.99))
    before = [copy.deepcopy(m.state_dict()) for m in (seg, D, C)]
    out, applied = train_step(
        helpers.context(StepModels(seg, D, C), so, do, helpers.settings(), contextlib.nullcontext),
        Batch(xs, ys, xt, None),
    )
    assert not applied
    for m, sd in zip((seg, D, C), before):
        for k, v in m.state_dict().items():
            if v.is_floating_point() and "running" not in k:
                assert torch.equal(v, sd[k]), k


def test_pseudo_label_loss_and_no_adversarial_path(f64) -> None:
    seg, D, C = _nets("paper")
    xs, ys, xt = _data()
    yt = torch.randint(0, 3, ys.shape)
    so = segmentor_optimizer(seg, lr=LR, momentum=MOM, weight_decay=WD, head_lr_mult=10.0, duplicate_params=False)
    out, _ = train_step(
        helpers.context(
            StepModels(seg, D, None),
            so,
            None,
            helpers.settings(adversarial=False, attention=True, mu=0.5),
            contextlib.nullcontext,
        ),
        Batch(xs, ys, xt, yt),
    )
    assert "loss/pseudo_seg" in out and "loss/adv_d" not in out
    assert out["loss/total"].item() == pytest.approx(out["loss/seg"].item() + 0.5 * out["loss/pseudo_seg"].item())
    assert all(p.grad is None for p in D.parameters())
