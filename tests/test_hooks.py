"""Each hook of the stage loop on its own, in a real loop around a real engine and tiny networks."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
from test_engine import CPU, _batch, _cfg, _networks, _runtime

from dast.checkpoint import load_checkpoint, read_meta
from dast.errors import NumericalFault
from dast.rundir import StageDir
from dast.training.engine import Engine, StepResult
from dast.training.hooks import CheckpointHook, EvalHook, FaultHook, Hook, HookInputs, LogHook, LogSettings
from dast.training.loop import SignalFlag, StageLoop, StageRun, TrainingInterrupted, run_stage
from dast.training.updates import ScaledUpdate


class _Data:
    """The same batch at every step; records restarts."""

    def __init__(self) -> None:
        self.restarted: list[int] = []
        self.is_open = False
        xs, ys, xt = _batch()
        self.batch = ({"image": xs, "label": ys, "name": ["s.png"]}, {"image": xt, "name": ["t.png"]})

    def open(self, step: int) -> None:
        self.is_open = True

    def next(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return self.batch

    def restart(self, step: int) -> None:
        self.restarted.append(step)

    def close(self) -> None:
        self.is_open = False


def _loop(tmp_path: Path, hooks: list[Hook], steps: int = 6) -> StageLoop:
    cfg = _cfg()
    nets = _networks()
    plan = helpers.plan("stage1", 0, steps)
    engine = Engine.build(plan, cfg, nets, _runtime())
    engine.train_modes(nets.modules())
    return StageLoop(
        cfg=cfg,
        plan=plan,
        nets=nets,
        runtime=engine.runtime,
        engine=engine,
        stage=StageDir(tmp_path / "stage1"),
        log=logging.getLogger("dast.test.hooks"),
        stop=SignalFlag(),
        run_digests=tmp_path / "digests" / "rank0.jsonl",
        data=_Data(),  # type: ignore[arg-type]  # the loop reads next/restart/is_open only
        hooks=hooks,
    )


def _train(loop: StageLoop, upto: int) -> None:
    if not loop.stage.root.exists():
        loop.resume()
    loop.data.open(loop.state.step)
    while loop.state.step < upto:
        loop.iterate()


def _weights(loop: StageLoop) -> list[torch.Tensor]:
    return [p.detach().clone() for m in loop.nets.modules() for p in m.parameters()]


def _failed(step: int = 0) -> StepResult:
    return StepResult(step, {"loss/seg": torch.tensor(float("nan"))}, False, 0.01, 1e-4)


def test_checkpoint_hook_saves_prunes_and_the_loop_resumes(tmp_path: Path) -> None:
    loop = _loop(tmp_path, [CheckpointHook(every=2, keep_last=2)])
    _train(loop, 5)
    assert not loop.resumed and [s for s, _ in loop.stage.checkpoint_files()] == [2, 4]
    _train(loop, 6)  # the last step is always saved; older ones pruned
    assert [s for s, _ in loop.stage.checkpoint_files()] == [4, 6]
    want = _weights(loop)
    loop.state.history.append({"stage": "stage1", "step": 6})
    loop.save(6)
    fresh = _loop(tmp_path, [CheckpointHook(every=2, keep_last=2)])  # new networks, same stage folder
    fresh.resume()
    assert fresh.resumed and fresh.state.step == 6 and fresh.state.history == [{"stage": "stage1", "step": 6}]
    assert all(torch.equal(a, b) for a, b in zip(want, _weights(fresh)))
    opt = fresh.engine.seg_opt
    assert all("momentum_buffer" in opt.state[p] for g in opt.param_groups for p in g["params"] if p.requires_grad)


def test_checkpoint_hook_saves_and_stops_on_sigterm(tmp_path: Path) -> None:
    loop = _loop(tmp_path, [CheckpointHook(every=100, keep_last=2)])
    _train(loop, 3)
    loop.stop.signum = signal.SIGTERM
    with pytest.raises(TrainingInterrupted, match="SIGTERM received at stage1 step 3"):
        loop.iterate()
    assert [s for s, _ in loop.stage.checkpoint_files()] == [3] and loop.state.step == 3


def test_eval_hook_keeps_the_best_snapshot_and_selects_it(tmp_path: Path) -> None:
    scores = iter([10.0, 30.0, 20.0])
    logged: list[tuple[dict, int]] = []
    hook = EvalHook(
        lambda nets, plan, step: {"synthetic": next(scores)},
        every=2,
        key="synthetic",
        select_on="synthetic",
        log_scalars=lambda s, i: logged.append((s, i)),
    )
    loop = _loop(tmp_path, [hook], steps=6)
    snapshots = {}
    for step in range(1, 7):
        _train(loop, step)
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
    hook = EvalHook(None, every=1, key=None, select_on="last")
    loop = _loop(tmp_path, [hook], steps=2)
    _train(loop, 2)
    hook.after_stage(loop)
    assert read_meta(loop.stage.selected)["step"] == 2 and loop.state.history == []


def test_fault_hook_skips_undoes_batchnorm_and_stops_after_a_streak(tmp_path: Path) -> None:
    hook = FaultHook("skip", max_consecutive=3, lr_factor=0.5)
    loop = _loop(tmp_path, [hook])
    hook.before_stage(loop)
    hook.before_step(loop)
    stats = {k: v.clone() for k, v in loop.nets.segmentor.state_dict().items() if "running" in k}
    with torch.no_grad():
        loop.nets.segmentor(torch.randn(2, 3, 40, 48))  # a forward pass moves the running statistics
    hook.on_fault(loop, _failed(), ["a.png"])
    assert all(torch.equal(v, loop.nets.segmentor.state_dict()[k]) for k, v in stats.items())
    hook.on_success(loop.state.step)  # a success ends the streak
    assert hook.consecutive == 0
    hook.on_fault(loop, _failed(), ["a.png"])
    hook.on_fault(loop, _failed(), ["b.png"])
    with pytest.raises(NumericalFault, match="3 consecutive non-finite losses in stage1 .*b.png"):
        hook.on_fault(loop, _failed(), ["b.png"])


def test_fault_hook_counts_faults_but_not_fp16_overflows(tmp_path: Path) -> None:
    hook = FaultHook("rollback", max_consecutive=2, lr_factor=0.5)
    loop = _loop(tmp_path, [hook])
    hook.before_stage(loop)
    hook.before_step(loop)
    loop.current = ({"name": ["s.png"]}, None)
    overflow = StepResult(0, {"loss/seg": torch.tensor(1.0)}, False, 0.01, 1e-4, overflow=True, note="fp16 ...")
    for _ in range(5):  # the loss scaler's own skips: no streak, no rollback, no learning-rate cut
        hook.after_step(loop, overflow)
    assert hook.consecutive == 0 and loop.engine.lr_scale == 1.0
    hook.after_step(loop, _failed())
    assert hook.consecutive == 1 and loop.engine.lr_scale == 0.5  # a real fault: counted, lr cut
    hook.after_step(loop, StepResult(0, {"loss/seg": torch.tensor(1.0)}, True, 0.01, 1e-4))
    assert hook.consecutive == 0
    hook.after_step(loop, _failed())
    with pytest.raises(NumericalFault, match="s.png"):
        hook.after_step(loop, _failed())


def test_checkpoint_keeps_the_fp16_loss_scale(tmp_path: Path) -> None:
    loop = _loop(tmp_path, [CheckpointHook(every=2, keep_last=2)])
    loop.engine.update = ScaledUpdate(CPU)
    loop.engine.update.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loop.engine.update.scaler.scale(torch.ones(()))  # the scale tensor exists from the first use
    loop.engine.update.scaler.update(new_scale=64.0)
    _train(loop, 2)
    assert read_meta(loop.stage.checkpoint(2))["engine"]["update"]["grad_scaler"]["scale"] == 64.0
    resumed = _loop(tmp_path, [CheckpointHook(every=2, keep_last=2)])
    resumed.engine.update = ScaledUpdate(CPU)
    resumed.engine.update.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    resumed.resume()
    assert resumed.state.step == 2 and resumed.engine.update.scale == 64.0


def test_fault_hook_rolls_back_to_the_last_checkpoint_at_a_lower_learning_rate(tmp_path: Path) -> None:
    faults = FaultHook("rollback", max_consecutive=5, lr_factor=0.5)
    loop = _loop(tmp_path, [faults, CheckpointHook(every=2, keep_last=2)])
    faults.before_stage(loop)
    faults.on_fault(loop, _failed(), ["x"])  # nothing to roll back to yet: skipped, lr cut
    assert loop.engine.lr_scale == 0.5 and loop.state.step == 0
    _train(loop, 2)
    at_two = _weights(loop)
    _train(loop, 3)
    faults.before_step(loop)
    faults.on_fault(loop, _failed(3), ["x"])
    assert loop.state.step == 2 and loop.data.restarted == [2]  # type: ignore[attr-defined]
    assert loop.engine.lr_scale == 0.25  # compounds over rollbacks
    assert all(torch.equal(a, b) for a, b in zip(at_two, _weights(loop)))


def test_a_rollback_ends_the_iteration_for_the_hooks_after_it(tmp_path: Path) -> None:
    seen: list[int] = []

    class Spy(Hook):
        def after_step(self, loop: Any, result: StepResult) -> None:
            seen.append(result.step)

    faults = FaultHook("rollback", max_consecutive=5, lr_factor=0.5)
    loop = _loop(tmp_path, [faults, CheckpointHook(every=2, keep_last=2), Spy()])
    faults.before_stage(loop)
    _train(loop, 2)
    good = loop.data.batch  # type: ignore[attr-defined]
    loop.data.batch = ({**good[0], "image": good[0]["image"] * float("nan")}, good[1])  # type: ignore[attr-defined]
    loop.iterate()  # step 2 fails: rolled back to the checkpoint of step 2, Spy not called
    assert seen == [0, 1] and loop.state.step == 2 and loop.engine.lr_scale == 0.5


def test_log_hook_logs_applied_steps_every_n_and_at_the_end(tmp_path: Path) -> None:
    rows: list[tuple[dict, int]] = []
    hook = LogHook(
        LogSettings(log_every=2, image_every=1000, digest_every=2, progress=False),
        log_scalars=lambda s, i: rows.append((s, i)),
    )
    loop = _loop(tmp_path, [hook], steps=5)
    _train(loop, 5)
    assert [i for _, i in rows] == [2, 4, 5]
    assert {"stage1/loss/seg", "stage1/lr/segmentor", "stage1/lr/discriminators"} <= set(rows[0][0])
    hook.after_step(loop, _failed())  # a skipped step logs no scalars
    assert len(rows) == 3
    assert len(loop.run_digests.read_text().splitlines()) == 2  # steps 2 and 4


class _Counter(Hook):
    """A trivial hook with state: it counts the iterations it saw."""

    name = "counter"

    def __init__(self) -> None:
        self.count = 0
        self.counts = torch.zeros(3, dtype=torch.int64)  # a tensor too: hooks may keep tensors

    def after_step(self, loop: Any, result: StepResult) -> None:
        self.count += 1
        self.counts[self.count % 3] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "nested": {"counts": self.counts}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.counts = state.get("nested", {}).get("counts", torch.zeros(3, dtype=torch.int64)).clone()


def test_a_new_hook_is_one_line_runs_every_step_is_checkpointed_and_restored(tiny_config, tmp_path: Path) -> None:
    from dast.config import load_config, resolve  # noqa: PLC0415 - test-local
    from dast.data.datasets import build_dataset  # noqa: PLC0415 - test-local
    from dast.training.plans import stage_plans  # noqa: PLC0415 - test-local
    from dast.training.setup import initial_networks, model_spec_for  # noqa: PLC0415 - test-local

    cfg = resolve(load_config(tiny_config(train={"steps": 5, "checkpoint_every": 2}, selection={"enabled": False})))
    plan = stage_plans(cfg, 1)[0]
    log = logging.getLogger("dast.test.counter")
    source = build_dataset(cfg.source, norm=cfg.model.norm, num_classes=cfg.model.num_classes, with_labels=True)
    target = build_dataset(cfg.target, norm=cfg.model.norm, num_classes=cfg.model.num_classes, with_labels=False)
    rt = _runtime()

    def stage(counter: _Counter, upto: int) -> None:
        nets = initial_networks(cfg, model_spec_for(cfg), log)
        run = StageRun(source, target, log, SignalFlag(), HookInputs(progress=False), extra_hooks=(counter,))
        run_stage(cfg, helpers.plan("stage1", 0, upto, eval_every=plan.eval_every), nets, rt, tmp_path / "stage1", run)

    first = _Counter()
    stage(first, 3)  # three steps: checkpoints at 2 and 3
    assert first.count == 3
    meta = read_meta(StageDir(tmp_path / "stage1").checkpoint(2))
    assert meta["hooks"]["counter"]["count"] == 2  # the checkpoint of step 2 holds the count of step 2
    resumed = _Counter()
    stage(resumed, 5)  # resumes at step 3 with the count restored, then runs steps 4 and 5
    assert first.counts.tolist() == [1, 1, 1]  # steps 1, 2, 3 land in slots 1, 2, 0
    assert resumed.count == 5 and resumed.counts.tolist() == [1, 2, 2]  # then 4 and 5 in slots 1 and 2
