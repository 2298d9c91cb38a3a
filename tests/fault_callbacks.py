"""Callbacks that break a run on purpose (used by tests/test_resume.py via Hydra overrides)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process when optimizer step ``step`` is about to start: no clean-up, no
    final save, exactly what a pre-empted node or an out-of-memory kill does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
