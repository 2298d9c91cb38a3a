"""Divergence: a non-finite loss or gradient stops the run with one line and keeps the last
good checkpoint; a collapsed embedding is warned about once."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from siamese.callbacks import DivergenceError, DivergenceGuard, divergence, embedding_spread
from siamese.pipelines.train import run_training
from siamese.task import TaskExit, task_wrapper

POISON = "+callbacks.poison._target_=fault_callbacks.PoisonAtStep"


RUN = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "checkpoints.every_n_train_steps=4",  # saves at steps 4, 6 (epoch end) and 8
]


def finite_weights(path: Path) -> tuple[int, bool]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    tensors = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    return ckpt["global_step"], all(bool(torch.isfinite(v).all()) for v in tensors)


def test_a_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(make_cfg):
    # A NaN weight before step 10 (epoch 1): the loss is NaN. Through the entry points'
    # task wrapper, as train.py runs it: one line, printed by siamese.task.run with exit 2.
    cfg = make_cfg(*RUN, POISON, "+callbacks.poison.step=10")
    with pytest.raises(TaskExit) as exited:
        task_wrapper(run_training)(cfg)
    line = exited.value.line
    assert "\n" not in line and line.startswith("error: "), line
    assert "training diverged at optimizer step 10 (epoch 1): the loss is nan" in line
    assert "lower optimizer.lr (e.g. optimizer.lr=" in line and "gradient_clip_val" in line
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is kept: {last}" in line
    # Step 8's save is the last: nothing was written from the broken weights.
    assert finite_weights(last) == (8, True)
    assert not list(last.parent.glob("last-v*.ckpt")) and not list(last.parent.glob(".*.tmp"))
    assert not (run_dir / "metrics.json").exists()


def test_a_non_finite_gradient_stops_before_the_step_is_applied(make_cfg):
    cfg = make_cfg(*RUN, POISON, "+callbacks.poison.step=3", "+callbacks.poison.grad=true")
    with pytest.raises(DivergenceError) as info:
        run_training(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert "optimizer step 3 (epoch 0): a gradient is not finite (loss " in message
    assert "no checkpoint had been written yet" in message
    assert not (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").exists()


def fake_trainer(step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=step,
        current_epoch=0,
        checkpoint_callbacks=[],
        precision_plugin=SimpleNamespace(),
        sanity_checking=False,
        is_global_zero=True,
    )


def one_parameter(size: int, lr: float):
    """A module, its single parameter and an SGD optimizer over it, as the guard sees them."""
    module = SimpleNamespace(device=torch.device("cpu"), automatic_optimization=True)
    param = torch.nn.Parameter(torch.ones(size))
    return module, param, torch.optim.SGD([param], lr=lr)


def test_on_a_gpu_the_check_is_read_back_later_but_names_the_exact_step(monkeypatch):
    monkeypatch.setattr(divergence, "reads_are_free", lambda device: False)
    guard = DivergenceGuard(check_every_n_steps=50)
    module, param, optimizer = one_parameter(3, 0.5)
    losses = [1.0, 0.9, math.inf, math.nan, 0.7]
    trainer = fake_trainer()
    for step, value in enumerate(losses):
        trainer.global_step = step
        param.grad = torch.full((3,), value)
        guard.on_before_backward(trainer, module, torch.tensor(value))
        guard.on_before_optimizer_step(trainer, module, optimizer)  # nothing read back yet
    with pytest.raises(
        DivergenceError, match=r"step 3 \(epoch 0\): the loss is inf; the learning rate 0\.5"
    ):
        guard.on_save_checkpoint(trainer, module, {})  # before any file is written


def test_the_check_is_read_every_n_steps_and_gradients_alone_count(monkeypatch):
    monkeypatch.setattr(divergence, "reads_are_free", lambda device: False)
    guard = DivergenceGuard(check_every_n_steps=2)
    module, param, optimizer = one_parameter(2, 0.1)
    trainer = fake_trainer(0)
    param.grad = torch.tensor([1.0, math.nan])
    guard.on_before_backward(trainer, module, torch.tensor(2.5))
    guard.on_before_optimizer_step(trainer, module, optimizer)  # step 1: recorded, not read
    trainer.global_step = 1
    param.grad = torch.ones(2)
    guard.on_before_backward(trainer, module, torch.tensor(2.0))
    with pytest.raises(DivergenceError, match=r"step 1 .*a gradient is not finite \(loss 2\.5\)"):
        guard.on_before_optimizer_step(trainer, module, optimizer)  # step 2: read


def test_under_a_gradient_scaler_only_the_loss_counts():
    # 16-bit mixed precision: inf gradients are the scaler's business (it skips the step).
    guard = DivergenceGuard()
    module, param, optimizer = one_parameter(2, 0.1)
    trainer = fake_trainer(0)
    trainer.precision_plugin = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    param.grad = torch.tensor([math.inf, 1.0])
    guard.on_before_backward(trainer, module, torch.tensor(65536.0 * 2.5))
    guard.on_before_optimizer_step(trainer, module, optimizer)  # no error
    trainer.global_step = 1
    guard.on_before_backward(trainer, module, torch.tensor(math.nan))
    with pytest.raises(DivergenceError, match=r"step 2 \(epoch 0\): the loss is nan"):
        guard.on_before_optimizer_step(trainer, module, optimizer)


def test_embedding_spread_on_hand_placed_points():
    spread, scale = embedding_spread(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]]))
    # centre (0, 1): distances sqrt(2), sqrt(2), 2; norms 1, 1, 3
    assert spread == pytest.approx((2 * math.sqrt(2) + 2) / 3)
    assert scale == pytest.approx(5 / 3)


def test_a_collapsed_embedding_is_warned_about_once(caplog):
    guard = DivergenceGuard()
    trainer = fake_trainer()
    healthy = torch.nn.functional.normalize(
        torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    )
    collapsed = torch.ones(50, 8) / math.sqrt(8) + 1e-6 * healthy
    caplog.set_level(logging.WARNING, logger="siamese.callbacks")
    for emb in (healthy, collapsed, collapsed):
        module = SimpleNamespace(last_eval=SimpleNamespace(stage="val", embeddings=emb))
        guard.on_validation_end(trainer, module)
    warnings = [r for r in caplog.records if "embedding collapse" in r.getMessage()]
    assert len(warnings) == 1
    assert "50 validation embeddings sit on one point" in warnings[0].getMessage()


def test_bad_guard_settings_are_one_line():
    with pytest.raises(ValueError, match="check_every_n_steps must be a positive int, got 0"):
        DivergenceGuard(check_every_n_steps=0)


def test_detect_anomaly_reaches_the_trainer(make_cfg):
    from siamese.config import build

    cfg = make_cfg("trainer.detect_anomaly=true")
    assert build(cfg.trainer)._detect_anomaly is True
