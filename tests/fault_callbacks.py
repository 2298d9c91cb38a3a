"""Callbacks that break a run on purpose, named by Hydra overrides (``+callbacks.x._target_=
fault_callbacks.X``) in tests/runs/ and tests/unit/callbacks/test_divergence.py."""

from __future__ import annotations

import os
import signal
import time

import pytorch_lightning as pl
import torch


class KillAtStep(pl.Callback):
    """SIGKILL this process when optimizer step ``step`` is about to start: no clean-up, no
    final save, exactly what a pre-empted node or an out-of-memory kill does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAtStep(pl.Callback):
    """Make the run diverge at optimizer step ``step``: a NaN weight (the loss goes NaN) or,
    with ``grad=true``, a NaN gradient on a finite loss."""

    def __init__(self, step: int, grad: bool = False) -> None:
        self.step = step
        self.grad = grad

    def _first_weight(self, pl_module):
        return next(p for p in pl_module.parameters() if p.requires_grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.grad and trainer.global_step + 1 == self.step:
            with torch.no_grad():
                self._first_weight(pl_module).view(-1)[0] = float("nan")

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.grad and trainer.global_step + 1 == self.step:
            self._first_weight(pl_module).grad.view(-1)[0] = float("inf")


class SlowTestOnRank(pl.Callback):
    """Process ``rank`` writes ``marker`` and sleeps ``seconds`` before its first test batch:
    the other processes run ahead, toward the gather of the test embeddings."""

    def __init__(self, rank: int, seconds: float, marker: str) -> None:
        self.rank, self.seconds, self.marker = rank, seconds, marker

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_rank == self.rank and batch_idx == 0:
            with open(self.marker, "w") as f:
                f.write("testing\n")
            time.sleep(self.seconds)


class SignalAt(pl.Callback):
    """Send ``name`` (a signal, e.g. SIGTERM) to this process the first time ``hook`` runs:
    a deterministic signal in that window. ``hook`` is one of ``fit_end`` (after fit's
    teardown, Lightning's handlers already given back), ``test_start``, ``test_batch_end``
    (at ``batch``; -1: the last one), ``test_epoch_end`` (before the module scores the split)
    and ``test_end``."""

    def __init__(self, hook: str, name: str = "SIGTERM", batch: int = 0) -> None:
        self.hook, self.signum, self.batch = hook, signal.Signals[name], batch
        self._sent = False

    def _send(self, hook: str) -> None:
        if hook == self.hook and not self._sent:
            self._sent = True
            os.kill(os.getpid(), self.signum)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._send("fit_end")

    def on_test_start(self, trainer, pl_module) -> None:
        self._send("test_start")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        last = batch_idx == trainer.num_test_batches[dataloader_idx] - 1
        if batch_idx == self.batch or (self.batch == -1 and last):
            self._send("test_batch_end")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._send("test_epoch_end")

    def on_test_end(self, trainer, pl_module) -> None:
        self._send("test_end")
