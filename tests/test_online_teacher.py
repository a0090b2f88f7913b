"""The mean teacher: EMA coefficient and update against hand-computed values, buffers,
prediction without gradients, and the flat state-dict round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dast.errors import CheckpointError
from dast.training.online.teacher import Teacher, ema_update_, ema_weight, has_foreach


def _net() -> nn.Sequential:
    """conv 1x1 (weight w, bias b) then BatchNorm over one channel."""
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.fill_(0.0)
        net[1].weight.fill_(1.0)
        net[1].bias.fill_(0.0)
    return net


def test_ema_weight_ramps_then_stops_at_alpha():
    assert ema_weight(0, 0.999) == 0.0  # the teacher starts as a copy
    assert ema_weight(1, 0.999) == 0.5
    assert ema_weight(3, 0.999) == 0.75
    assert ema_weight(9, 0.999) == pytest.approx(0.9)
    assert ema_weight(999, 0.999) == pytest.approx(0.999)  # 1 - 1/1000 meets alpha here
    assert ema_weight(5000, 0.999) == 0.999
    assert ema_weight(20, 0.9) == 0.9
    with pytest.raises(ValueError, match="step must be >= 0"):
        ema_weight(-1, 0.999)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        ema_weight(0, 1.5)


def test_ema_update_matches_hand_values_in_place():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    s = [torch.tensor([3.0, 6.0]), torch.tensor([[0.0]])]
    before = [x.data_ptr() for x in t]
    ema_update_(t, s, 0.25)
    # 0.25 * 1 + 0.75 * 3 = 2.5; 0.25 * 2 + 0.75 * 6 = 5; 0.25 * 4 + 0 = 1
    assert t[0].tolist() == [2.5, 5.0] and t[1].tolist() == [[1.0]]
    assert [x.data_ptr() for x in t] == before  # in place
    assert s[0].tolist() == [3.0, 6.0]  # the student is untouched
    with pytest.raises(ValueError, match="teacher has 2 tensors and the student 1"):
        ema_update_(t, s[:1], 0.5)


def test_ema_update_foreach_and_loop_give_the_same_bits():
    assert has_foreach()
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 2)]
    student = [torch.randn(s, generator=g) for s in shapes]
    a = [torch.randn(s, generator=g) for s in shapes]
    b = [x.clone() for x in a]
    for step in range(1, 6):
        ema_update_(a, student, ema_weight(step, 0.99), foreach=True)
        ema_update_(b, student, ema_weight(step, 0.99), foreach=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_teacher_starts_as_a_frozen_copy():
    student = _net()
    teacher = Teacher(student)
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert teacher.module is not student and not teacher.module.training
    for (name, t), (_, s) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(t, s), name
        assert t.data_ptr() != s.data_ptr()


@pytest.mark.parametrize("buffers", ["copy", "ema"])
def test_teacher_update_parameters_and_buffers(buffers: str):
    student = _net()
    teacher = Teacher(student, alpha=0.999, buffers=buffers)
    with torch.no_grad():
        student[0].weight.fill_(3.0)
        student[0].bias.fill_(-2.0)
        student[1].running_mean.fill_(4.0)
        student[1].running_var.fill_(3.0)
        student[1].num_batches_tracked.fill_(7)
    assert teacher.update(student, step=1) == 0.5
    t = teacher.module
    assert t[0].weight.item() == 2.0  # 0.5 * 1 + 0.5 * 3
    assert t[0].bias.item() == -1.0  # 0.5 * 0 + 0.5 * -2
    if buffers == "copy":
        assert t[1].running_mean.item() == 4.0 and t[1].running_var.item() == 3.0
    else:  # 0.5 * 0 + 0.5 * 4 and 0.5 * 1 + 0.5 * 3
        assert t[1].running_mean.item() == 2.0 and t[1].running_var.item() == 2.0
    assert t[1].num_batches_tracked.item() == 7  # integer buffers are always copied
    assert t[1].num_batches_tracked.dtype == torch.int64
    # step 3: weight 0.75 on the teacher
    assert teacher.update(student, step=3) == 0.75
    assert t[0].weight.item() == 0.75 * 2.0 + 0.25 * 3.0
    assert student[0].weight.item() == 3.0


def test_teacher_update_at_step_zero_copies_the_student():
    student = _net()
    teacher = Teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(student, step=0)
    for name, p in student.named_parameters():
        assert torch.equal(dict(teacher.module.named_parameters())[name], p), name


def test_teacher_update_reads_nothing_back_from_the_device(monkeypatch: pytest.MonkeyPatch):
    student = _net()
    teacher = Teacher(student, buffers="ema")

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a host read-back during the teacher update")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    teacher.update(student, step=5)


def test_teacher_rejects_a_different_network_and_unwraps_wrappers():
    teacher = Teacher(_net())
    with pytest.raises(ValueError, match="do not match the teacher's"):
        teacher.update(nn.Sequential(nn.Conv2d(1, 1, 1)), step=1)
    wrapped = nn.DataParallel(_net())  # a CPU DataParallel just holds .module, like DDP
    teacher = Teacher(wrapped)
    assert "0.weight" in teacher.state_dict()
    teacher.update(wrapped, step=1)
    with pytest.raises(ValueError, match="unknown buffer rule 'mean'"):
        Teacher(_net(), buffers="mean")  # type: ignore[arg-type]


def test_predict_has_no_gradient_and_uses_running_or_batch_statistics():
    student = _net()
    teacher = Teacher(student)
    with torch.no_grad():
        teacher.module[1].running_mean.fill_(1.0)
        teacher.module[1].running_var.fill_(4.0)
    x = torch.tensor([[[[1.0, 3.0]]]], requires_grad=True)  # 1 x 1 x 1 x 2
    out = teacher.predict(x)
    assert not out.requires_grad
    eps = teacher.module[1].eps
    # eval mode: (x - 1) / sqrt(4 + eps)
    assert torch.allclose(out, (x.detach() - 1.0) / (4.0 + eps) ** 0.5)
    batch = Teacher(student, batch_stats=True)
    with torch.no_grad():
        batch.module[1].running_mean.fill_(1.0)
    out = batch(x)  # batch mean 2, biased variance 1
    assert torch.allclose(out, (x.detach() - 2.0) / (1.0 + eps) ** 0.5)
    bn = batch.module[1]
    assert bn.running_mean.item() == 1.0 and bn.num_batches_tracked.item() == 0  # left untouched
    assert bn.track_running_stats and not bn.training


def test_state_dict_round_trip_through_safetensors(tmp_path):
    student = _net()
    teacher = Teacher(student, buffers="ema")
    with torch.no_grad():
        student[0].weight.fill_(5.0)
        student[1].running_mean.fill_(2.0)
    teacher.update(student, step=1)
    state = teacher.state_dict()
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in state.values())
    assert set(state) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "teacher.safetensors"))
    fresh = Teacher(_net(), buffers="ema")
    fresh.load_state_dict(load_file(str(tmp_path / "teacher.safetensors")))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 1, 3, 3)
    assert torch.equal(fresh.predict(x), teacher.predict(x))
    # both continue identically
    teacher.update(student, step=2)
    fresh.update(student, step=2)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), fresh.state_dict().values()))


def test_load_state_dict_names_what_does_not_fit():
    teacher = Teacher(_net())
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    del state["0.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing 0.bias; unexpected extra"):
        teacher.load_state_dict(state)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    state["0.weight"] = torch.zeros(2, 1, 1, 1)
    with pytest.raises(CheckpointError, match=r"0.weight has shape \(2, 1, 1, 1\), expected \(1, 1, 1, 1\)"):
        teacher.load_state_dict(state)
