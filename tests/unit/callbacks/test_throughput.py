"""The throughput callback: images per second of training wall clock, both sides of pairs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import siamese.callbacks.throughput
from siamese.callbacks import (
    Throughput,
    batch_images,
)


# -- Throughput ---------------------------------------------------------------------------
class FakeModule:
    def __init__(self) -> None:
        self.logged: list[tuple[str, float, dict[str, Any]]] = []

    def log(self, name: str, value: float, **kwargs: Any) -> None:
        self.logged.append((name, value, kwargs))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(siamese.callbacks.throughput.time, "perf_counter", lambda: now[0])
    return now


def in_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 1, 4, 4), torch.zeros(n, dtype=torch.long)


def explicit(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 1, 4, 4), torch.zeros(n, 1, 4, 4), torch.zeros(n, dtype=torch.bool)


def test_batch_images_counts_both_sides_of_explicit_pairs():
    assert batch_images(in_batch(10)) == 10
    assert batch_images(explicit(4)) == 8


def test_throughput_is_images_over_training_wall_clock(clock):
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=2, world_size=1)
    module, cb = FakeModule(), Throughput()
    cb.on_train_start(trainer, module)
    cb.on_train_epoch_start(trainer, module)  # t = 100

    def step(batch: Any, seconds: float, stepped: bool = True) -> None:
        cb.on_train_batch_start(trainer, module, batch, 0)
        clock[0] += seconds
        trainer.global_step += stepped
        cb.on_train_batch_end(trainer, module, None, batch, 0)

    step(in_batch(10), 1.0)  # step 1: not a logging point
    assert module.logged == []
    step(explicit(4), 1.0)  # step 2: 10 + 2 * 4 images in 2 s
    ((name, rate, kwargs),) = module.logged
    assert name == "train/images_per_sec" and rate == pytest.approx(9.0)
    assert kwargs["on_step"] is True and kwargs["on_epoch"] is False

    clock[0] += 0.5  # counted: between steps (data loading)
    cb.on_validation_start(trainer, module)
    clock[0] += 30.0  # validation and its pictures: not training time
    cb.on_validation_end(trainer, module)
    clock[0] += 7.0  # idle until the next batch: not counted either
    step(in_batch(20), 1.0)
    step(in_batch(20), 0.25, stepped=False)  # gradient accumulation: no optimizer step
    step(in_batch(20), 0.25)  # step 4
    assert len(module.logged) == 2
    assert module.logged[1][1] == pytest.approx(60 / (0.5 + 1.0 + 0.25 + 0.25))

    step(in_batch(20), 0.25, stepped=False)  # still step 4: logged once, counted next
    assert len(module.logged) == 2

    cb.on_train_epoch_end(trainer, module)
    clock[0] += 100.0  # between epochs
    cb.on_train_epoch_start(trainer, module)
    trainer.world_size = 2  # DDP: this process's rate times the world size
    step(in_batch(8), 2.0)
    step(in_batch(8), 2.0)  # step 6
    assert len(module.logged) == 3
    assert module.logged[2][1] == pytest.approx(2 * (20 + 16) / (0.25 + 4.0))


def test_throughput_never_logs_when_logging_is_off(clock):
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=0, world_size=1)
    module, cb = FakeModule(), Throughput()
    cb.on_train_start(trainer, module)
    for _ in range(3):
        cb.on_train_batch_start(trainer, module, in_batch(4), 0)
        clock[0] += 1.0
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, in_batch(4), 0)
    assert module.logged == []
