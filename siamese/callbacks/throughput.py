"""``Throughput``: images embedded per second of training, logged as ``train/images_per_sec``."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


def batch_images(batch: Any) -> int:
    """Images a batch embeds: ``2 * len(x1)`` for ``(x1, x2, same)``, else ``len(images)``."""
    if len(batch) == 3:
        return 2 * len(batch[0])
    return len(batch[0])


class Throughput(Callback):
    """Log ``train/images_per_sec``: images embedded per second of training wall clock.

    The rate is measured over the steps between two logging points (every
    ``trainer.log_every_n_steps`` optimizer steps), data loading included and validation
    left out, without synchronising the device (queued GPU work lands in a later window, so
    windows average out). Under DDP it is this process's rate times the world size.

    Args:
        prog_bar: also show the rate in the progress bar.
    """

    def __init__(self, prog_bar: bool = False) -> None:
        super().__init__()
        self.prog_bar = prog_bar
        self._images = 0
        self._elapsed = 0.0
        self._started: float | None = None  # clock at the start of the running stretch
        self._last_step = 0

    def _resume(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def _pause(self) -> None:
        if self._started is not None:
            self._elapsed += time.perf_counter() - self._started
            self._started = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images, self._elapsed, self._started = 0, 0.0, None
        self._last_step = trainer.global_step  # resumed runs go on from their step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._resume()
        self._images += batch_images(batch)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # After the optimizer step global_step is the step Lightning is about to log at;
        # an unchanged step means gradient accumulation is still going on.
        step, every = trainer.global_step, trainer.log_every_n_steps
        if every < 1 or step == self._last_step or step % every:
            return
        self._last_step = step
        self._pause()
        if self._elapsed > 0:
            rate = self._images * trainer.world_size / self._elapsed
            pl_module.log(
                "train/images_per_sec",
                rate,
                on_step=True,
                on_epoch=False,
                prog_bar=self.prog_bar,
                batch_size=1,
            )
        self._images, self._elapsed = 0, 0.0
        self._resume()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation (and what other callbacks do after it) is not training time: the clock
        # stops here and goes on at the next training batch.
        self._pause()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause()
