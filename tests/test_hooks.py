"""Each hook of the stage loop on its own, around a real engine and tiny networks."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_engine import _batch, _cfg, _networks, _runtime

from dast.checkpoint import load_checkpoint, read_meta
from dast.errors import NumericalFault
from dast.rundir import StageDir
from dast.training.engine import Engine, StagePlan, StepResult
from dast.training.hooks import CheckpointHook, EvalHook, FaultHook, LogHook, StageState


class _Data:
    def __init__(self) -> None:
        self.restarted: list[int] = []

    def restart(self, step: int) -> None:
        self.restarted.append(step)


class _Logger:
    def __init__(self) -> None:
        self.rewound: list[int] = []

    def rewind(self, step: int) -> None:
        self.rewound.append(step)


def _loop(tmp_path: Path, steps: int = 6) -> SimpleNamespace:
    cfg = _cfg()
    nets = _networks()
    plan = StagePlan("stage1", 0, steps, 100, 0.01, 10.0, False, adversarial=True)
    engine = Engine.build(plan, cfg, nets, _runtime())
    engine.train_modes(nets.modules())
    return SimpleNamespace(
        cfg=cfg,
        plan=plan,
        nets=nets,
        runtime=engine.runtime,
        engine=engine,
        stage=StageDir(tmp_path / "stage1"),
        log=logging.getLogger("dast.test.hooks"),
        state=StageState(),
        data=_Data(),
        logger=_Logger(),
        checkpoints=None,
        resumed=False,
        run_digests=tmp_path / "digests" / "rank0.jsonl",
    )


def _train(loop: SimpleNamespace, hooks: list, upto: int) -> None:
    xs, ys, xt = _batch()
    while loop.state.step < upto:
        result = loop.engine.step(loop.state.step, xs, ys, xt, None)
        loop.state.step += 1
        for h in hooks:
            h.after_step(loop, result, {"name": ["s"]}, None)


def _weights(loop: SimpleNamespace) -> list[torch.Tensor]:
    return [p.detach().clone() for m in loop.nets.modules() for p in m.parameters()]


def test_checkpoint_hook_saves_prunes_and_resumes(tmp_path: Path) -> None:
    loop = _loop(tmp_path)
    hook = CheckpointHook(every=2, keep_last=2)
    hook.before_stage(loop)
    assert not loop.resumed and loop.stage.checkpoints.is_dir()
    _train(loop, [hook], 5)
    assert [s for s, _ in loop.stage.checkpoint_files()] == [2, 4]
    _train(loop, [hook], 6)  # the last step is always saved; older ones pruned
    assert [s for s, _ in loop.stage.checkpoint_files()] == [4, 6]
    want = _weights(loop)
    loop.state.history.append({"stage": "stage1", "step": 6})
    hook.save(loop, 6)
    fresh = _loop(tmp_path)  # new networks, same stage folder: resumes
    hook.before_stage(fresh)
    assert fresh.resumed and fresh.state.step == 6 and fresh.state.history == [{"stage": "stage1", "step": 6}]
    assert all(torch.equal(a, b) for a, b in zip(want, _weights(fresh)))
    opt = fresh.engine.seg_opt
    assert all("momentum_buffer" in opt.state[p] for g in opt.param_groups for p in g["params"] if p.requires_grad)


def test_eval_hook_keeps_the_best_snapshot_and_selects_it(tmp_path: Path) -> None:
    loop = _loop(tmp_path, steps=6)
    loop.stage.root.mkdir(parents=True)
    scores = iter([10.0, 30.0, 20.0])
    logged: list[tuple[dict, int]] = []
    hook = EvalHook(
        lambda nets, plan, step: {"synthetic": next(scores)},
        every=2,
        key="synthetic",
        select_on="synthetic",
        log_scalars=lambda s, i: logged.append((s, i)),
    )
    snapshots = {}
    for step in range(1, 7):
        _train(loop, [hook], step)
        snapshots[step] = _weights(loop)
    assert [h["synthetic"] for h in loop.state.history] == [10.0, 30.0, 20.0]
    assert loop.state.best == {"step": 4, "value": 30.0, "key": "synthetic"}
    assert [i for _, i in logged] == [2, 4, 6]
    hook.after_stage(loop)
    meta = read_meta(loop.stage.selected)
    assert meta["step"] == 4 and loop.stage.best.exists() and not loop.stage.best_step_files()

    tensors, _ = load_checkpoint(loop.stage.selected)
    seg_weight = tensors["segmentor.encoder.conv1.weight"]
    assert torch.equal(seg_weight, snapshots[4][0])  # the weights of step 4, not the last ones
    assert not torch.equal(seg_weight, snapshots[6][0])


def test_eval_hook_without_a_key_selects_the_last_step(tmp_path: Path) -> None:
    loop = _loop(tmp_path, steps=2)
    loop.stage.root.mkdir(parents=True)
    hook = EvalHook(None, every=1, key=None, select_on="last")
    _train(loop, [hook], 2)
    hook.after_stage(loop)
    assert read_meta(loop.stage.selected)["step"] == 2 and loop.state.history == []


def _failed(loop: SimpleNamespace) -> StepResult:
    return StepResult({"loss/seg": torch.tensor(float("nan"))}, False, 0.01, 1e-4)


def test_fault_hook_skips_undoes_batchnorm_and_stops_after_a_streak(tmp_path: Path) -> None:
    loop = _loop(tmp_path)
    hook = FaultHook("skip", max_consecutive=3, lr_factor=0.5)
    hook.before_stage(loop)
    hook.before_step()
    stats = {k: v.clone() for k, v in loop.nets.segmentor.state_dict().items() if "running" in k}
    with torch.no_grad():
        loop.nets.segmentor(torch.randn(2, 3, 40, 48))  # a forward pass moves the running statistics
    assert hook.on_fault(loop, _failed(loop), ["a.png"]) is False
    assert all(torch.equal(v, loop.nets.segmentor.state_dict()[k]) for k, v in stats.items())
    hook.on_success(loop.state.step)  # a success ends the streak
    assert hook.consecutive == 0
    hook.on_fault(loop, _failed(loop), ["a.png"])
    hook.on_fault(loop, _failed(loop), ["b.png"])
    with pytest.raises(NumericalFault, match="3 consecutive non-finite losses in stage1 .*b.png"):
        hook.on_fault(loop, _failed(loop), ["b.png"])


def test_fault_hook_counts_faults_but_not_fp16_overflows(tmp_path: Path) -> None:
    loop = _loop(tmp_path)
    hook = FaultHook("rollback", max_consecutive=2, lr_factor=0.5)
    hook.before_stage(loop)
    hook.before_step()
    source = {"name": ["s.png"]}
    overflow = StepResult({"loss/seg": torch.tensor(1.0)}, False, 0.01, 1e-4, overflow=True)
    for _ in range(5):  # the GradScaler's own skips: no streak, no rollback, no learning-rate cut
        assert hook.after_result(loop, overflow, source, None) is False
    assert hook.consecutive == 0 and loop.engine.lr_scale == 1.0
    assert hook.after_result(loop, _failed(loop), source, None) is False
    assert hook.consecutive == 1 and loop.engine.lr_scale == 0.5  # a real fault: counted, lr cut
    applied = StepResult({"loss/seg": torch.tensor(1.0)}, True, 0.01, 1e-4)
    assert hook.after_result(loop, applied, source, None) is False and hook.consecutive == 0
    hook.after_result(loop, _failed(loop), source, None)
    with pytest.raises(NumericalFault, match="s.png"):
        hook.after_result(loop, _failed(loop), source, None)


def test_fp16_overflows_stop_the_run_once_the_loss_scale_cannot_help(tmp_path: Path) -> None:
    loop = _loop(tmp_path)
    loop.engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-20)
    loop.engine.scaler.scale(torch.ones(()))
    hook = FaultHook("skip", max_consecutive=3, lr_factor=0.5)
    hook.before_stage(loop)
    overflow = StepResult({"loss/seg": torch.tensor(1.0)}, False, 0.01, 1e-4, overflow=True)
    assert hook.after_result(loop, overflow, {"name": ["s.png"]}, None) is False  # 2^-20: still worth trying
    loop.engine.scaler.update(new_scale=2.0**-25)
    with pytest.raises(NumericalFault, match=r"loss scale fell to 2.98023e-08 .*overflow at any scale"):
        hook.after_result(loop, overflow, {"name": ["s.png"]}, None)


def test_checkpoint_keeps_the_fp16_loss_scale(tmp_path: Path) -> None:
    loop = _loop(tmp_path)
    loop.engine.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loop.engine.scaler.scale(torch.ones(()))  # the scale tensor exists from the first use
    loop.engine.scaler.update(new_scale=64.0)
    hook = CheckpointHook(every=2, keep_last=2)
    hook.before_stage(loop)
    _train(loop, [hook], 2)
    assert read_meta(loop.stage.checkpoint(2))["stage_state"]["grad_scaler"]["scale"] == 64.0
    resumed = _loop(tmp_path)
    resumed.engine.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    CheckpointHook(every=2, keep_last=2).before_stage(resumed)
    assert resumed.state.step == 2 and resumed.engine.scaler.get_scale() == 64.0


def test_fault_hook_rolls_back_to_the_last_checkpoint_at_a_lower_learning_rate(tmp_path: Path) -> None:
    loop = _loop(tmp_path)
    ckpt = CheckpointHook(every=2, keep_last=2)
    ckpt.before_stage(loop)
    loop.checkpoints = ckpt
    faults = FaultHook("rollback", max_consecutive=5, lr_factor=0.5)
    faults.before_stage(loop)
    assert faults.on_fault(loop, _failed(loop), ["x"]) is False  # nothing to roll back to yet
    assert loop.engine.lr_scale == 0.5
    _train(loop, [ckpt], 2)
    at_two = _weights(loop)
    _train(loop, [ckpt], 3)
    faults.before_step()
    assert faults.on_fault(loop, _failed(loop), ["x"]) is True
    assert loop.state.step == 2 and loop.data.restarted == [2] and loop.logger.rewound == [2]
    assert loop.engine.lr_scale == 0.25  # compounds over rollbacks
    assert all(torch.equal(a, b) for a, b in zip(at_two, _weights(loop)))


def test_log_hook_logs_applied_steps_every_n_and_at_the_end(tmp_path: Path) -> None:
    loop = _loop(tmp_path, steps=5)
    rows: list[tuple[dict, int]] = []
    hook = LogHook(
        log_every=2, image_every=1000, digest_every=2, progress=False, log_scalars=lambda s, i: rows.append((s, i))
    )
    _train(loop, [hook], 5)
    assert [i for _, i in rows] == [2, 4, 5]
    assert {"stage1/loss/seg", "stage1/lr/segmentor", "stage1/lr/discriminators"} <= set(rows[0][0])
    hook.after_step(loop, _failed(loop), {"name": ["s"]}, None)  # a skipped step logs no scalars
    assert len(rows) == 3
    assert len(loop.run_digests.read_text().splitlines()) == 2  # steps 2 and 4
