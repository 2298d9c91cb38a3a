"""Callbacks for what a run shows and how it fails: throughput, pictures, divergence.

``Throughput`` logs ``train/images_per_sec`` at the trainer's logging points.
``LastCheckpoint`` writes ``last.ckpt`` at every epoch's end, every N steps, and at the end
of the batch a SIGTERM, a Ctrl-C or a requeue signal came in (resume).
``DivergenceGuard`` stops a run at the first non-finite loss or gradient, before any
checkpoint is written from broken weights, and warns once about a collapsed embedding.
``DashboardPlots`` draws pictures of the evaluated split (sample pairs with their distances,
same/different distance histograms, ROC, a 2-D projection, a retrieval grid) after
validation every few epochs, after the last validation of ``fit`` and after ``test``; each
picture becomes a PNG under ``save_dir`` and goes to every attached logger in its own form
(TensorBoard images and embedding projector, W&B images and a neighbour table).
``BackboneFreeze`` (``siamese.finetuning``) keeps a pretrained backbone frozen for the
first epochs.
``select_callbacks`` drops the progress bar and model summary the trainer flags switch off.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.image import imsave
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelSummary, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import Tensor

from siamese.data.pairs import sample_pairs
from siamese.errors import ConfigError, SiameseError
from siamese.evaluation.index import build_index
from siamese.evaluation.plots import (
    PROJECTIONS,
    distance_histograms_figure,
    embeddings_2d_figure,
    figure_to_rgb,
    pair_grid_figure,
    retrieval_grid_figure,
    roc_figure,
)
from siamese.finetuning import BackboneFreeze as BackboneFreeze  # conf: siamese.callbacks.*

log = logging.getLogger(__name__)

# Picture names: the PNG files of each folder, and the last part of each logger key.
PICTURES = ("pairs", "distances", "roc", "embeddings_2d", "retrieval")
# TensorBoard's projector reads one sprite sheet, at most 8192 pixels a side.
_SPRITE_SIDE = 8192
_THUMBNAIL_MAX = 64
# Neighbours a retrieval row shows at most: a longer row is unreadable, and drawing
# max_queries x top_k thumbnails (8 x 499 for top_k=100000 on 500 images) looks like a hang.
MAX_TOP_K = 20
_SEED = 0  # fixed queries and pairs, so pictures of successive epochs compare


def select_callbacks(
    callbacks: Iterable[Callback], trainer_cfg: Mapping[str, Any]
) -> list[Callback]:
    """The callbacks the trainer flags allow.

    Lightning refuses a progress-bar callback when ``enable_progress_bar`` is false and
    would still print a configured model summary when ``enable_model_summary`` is false, so
    both are dropped where their flag is off.
    """
    bar = bool(trainer_cfg.get("enable_progress_bar", True))
    summary = bool(trainer_cfg.get("enable_model_summary", True))
    return [
        c
        for c in callbacks
        if not (isinstance(c, ProgressBar) and not bar)
        and not (isinstance(c, ModelSummary) and not summary)
    ]


def is_positive_int(value: Any) -> bool:
    """An int (not a bool) of at least 1: a count or an interval from a config."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


def parse_signal(name: str | int | None) -> signal.Signals | None:
    """``SIGUSR2``, ``USR2`` or a number as a signal; None for none."""
    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "none", "null")):
        return None
    try:
        if isinstance(name, Integral) or str(name).isdigit():
            return signal.Signals(int(name))
        text = str(name).strip().upper()
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ConfigError(
            f"checkpoints.requeue_signal={name!r} is not a signal; use SIGUSR2 (what "
            "submitit sends), another name such as SIGUSR1, or null"
        ) from None


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


class StopSignalled(SIGTERMException):
    """A run stopped for a signal (``signum``) at a batch's or epoch's end: while fitting with
    ``last.ckpt`` written there, while testing with nothing to save. A ``SIGTERMException``
    (a ``SystemExit``), as Lightning's own stop for SIGTERM, so Lightning runs its interrupt
    hooks and tears down the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = int(signum)


class LastCheckpoint(Checkpoint):
    """Write ``<dirpath>/<filename>.ckpt`` at every training epoch's end (after its
    validation, so it holds the calibrated threshold) and every ``every_n_train_steps``
    optimizer steps: the state ``ckpt_path=last`` resumes from.

    Lightning's own ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` at an epoch's
    end only when that epoch also saved a top-k checkpoint (since Lightning 2.6), so after an
    epoch that did not improve, "last" would be an older epoch. Each save goes through the
    trainer's checkpoint IO (temporary file, fsync, rename), so a kill mid-save keeps the
    previous file.

    A job about to be stopped loses nothing either. On ``SIGTERM`` (a pre-emption, a
    ``kill``) training stops after the running training batch, with ``last.ckpt`` written
    at its end. With one process that is Lightning's own stop. Under DDP, Lightning 2.6's
    SIGTERM handler broadcasts from inside the signal handler, which can meet another
    rank's gradient all-reduce and hang every process; while fitting, the handler here only
    notes the signal, and at each training batch's end (and epoch's end) the processes agree
    with one tiny all-reduce whether any of them got it, then all save and stop together
    (Lightning already reads a flag back from the device at every DDP step). The test after
    fitting stops at a test batch's end too, nothing saved (training has finished): under
    DDP agreed the same way, with one process also at the last batch, where Lightning's own
    check lets the test go on. The sanity check before training is not covered under DDP.

    Ctrl-C (``SIGINT``) while fitting is handled the same way: the first press says that
    training stops at the end of the running training batch (after validation, if it is
    running) with ``last.ckpt`` written, and it does (under DDP every process, as with
    SIGTERM); a second press stops at once, unsaved, as Lightning does (its "graceful
    shutdown"). Only Python's default SIGINT handler is replaced (not an ignored SIGINT, as
    in a background job, nor another handler). Either stop raises ``StopSignalled``.

    When ``requeue_signal`` already has a Python handler as training starts (submitit
    installs one for ``SIGUSR2``, which SLURM sends ``signal_delay_s`` before a time limit
    or a pre-emption), the signal is held until the running training batch ends (during
    validation: the epoch), ``last.ckpt`` is written, and then it goes on to that handler
    (submitit requeues the job and exits; ``ckpt_path=auto`` resumes at that step). Only
    rank 0 writes there, with no barrier: submitit signals ranks apart, and only rank 0
    requeues. A signal with no handler keeps its default action.

    Args:
        dirpath: folder of the checkpoint.
        filename: its name without ``.ckpt``.
        every_n_train_steps: also save every this many optimizer steps (null: epochs only).
        requeue_signal: the signal name (``SIGUSR2``) to save on before its handler runs, or
            null for none.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "last",
        every_n_train_steps: int | None = None,
        requeue_signal: str | None = "SIGUSR2",
    ) -> None:
        super().__init__()
        if every_n_train_steps is not None and not is_positive_int(every_n_train_steps):
            raise ConfigError(
                "checkpoints.every_n_train_steps must be a positive int or null, got "
                f"{every_n_train_steps!r}"
            )
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.every_n_train_steps = every_n_train_steps
        self.requeue_signal = parse_signal(requeue_signal)
        self.last_model_path = ""
        self._step_saved = -1  # the optimizer step of the last save during an epoch
        self._handed_on: Any = None  # the handler the signal goes on to, while held
        self._held: tuple[int, Any] | None = None  # (signum, frame) of a held signal
        self._lightning_sigterm: Any = None  # Lightning's SIGTERM handler, while replaced
        self._int_handler: Any = None  # Python's SIGINT handler, while replaced
        self._noted = 0  # the stop signal this process got while fitting (0: none)
        self._pressed = False  # Ctrl-C was pressed once while fitting
        self._says = False  # this process prints the Ctrl-C line (rank 0)

    def _save(self, trainer: pl.Trainer, barrier: bool = True) -> None:
        path = self.dirpath / f"{self.filename}.ckpt"
        if barrier:
            trainer.save_checkpoint(path, weights_only=False)
        else:  # rank 0 alone: Trainer.save_checkpoint would wait for the others
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.save_checkpoint(checkpoint, path)
        self.last_model_path = str(path)

    # -- the requeue signal ----------------------------------------------------------------
    def _hold(self, signum: int, frame: Any) -> None:
        if self._held is None:
            self._held = (signum, frame)

    def _give_back_requeue_signal(self) -> None:
        if self._handed_on is not None:
            signal.signal(self.requeue_signal, self._handed_on)
            self._handed_on = None

    def _release(self) -> None:
        """Give the signals back to their handlers, dropping a held one."""
        self._held = None
        self._give_back_requeue_signal()
        if self._lightning_sigterm is not None:
            signal.signal(signal.SIGTERM, self._lightning_sigterm)
            self._lightning_sigterm = None
        if self._int_handler is not None:
            # After a second Ctrl-C Lightning ignores SIGINT until its teardown puts back the
            # handlers it found: leave that to it.
            if signal.getsignal(signal.SIGINT) == self._note_interrupt:
                signal.signal(signal.SIGINT, self._int_handler)
            self._int_handler = None

    def _hand_on(self, trainer: pl.Trainer) -> None:
        handler, held = self._handed_on, self._held
        if held is None or not callable(handler):
            return
        self._held = None
        self._give_back_requeue_signal()
        if trainer.is_global_zero:
            log.info(
                "%s: last.ckpt written at step %d; handing the signal on",
                signal.Signals(held[0]).name,
                trainer.global_step,
            )
        handler(*held)

    # -- SIGTERM under DDP, and Ctrl-C ------------------------------------------------------
    def _note_sigterm(self, signum: int, frame: Any) -> None:
        self._noted = max(self._noted, signum)  # no collective here: this rank may be in one

    def _note_interrupt(self, signum: int, frame: Any) -> None:
        if self._pressed:  # the second press: stop at once, as Lightning does
            signal.default_int_handler(signum, frame)
        self._pressed = True
        self._noted = max(self._noted, signum)
        if self._says:  # os.write: a print could land inside another write to stderr
            os.write(
                2,
                b"\nCtrl-C: training stops at the end of this batch (after validation, if it "
                + f"is running) with {self.dirpath / self.filename}.ckpt written; press "
                "Ctrl-C again to stop at once without saving\n".encode(),
            )

    def _stop_agreed(self, trainer: pl.Trainer) -> int:
        """The signal training stops for now (0: none). Under DDP every rank calls this at the
        same points, and one all-reduce tells them all whether any rank got one."""
        if self._lightning_sigterm is None:
            if self._noted:
                return self._noted
            return signal.SIGTERM if trainer.received_sigterm else 0
        flag = torch.tensor([float(self._noted)], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _stop_for(self, trainer: pl.Trainer, signum: int, saved: bool = True) -> None:
        if trainer.is_global_zero:
            log.info(
                "%s: %s; stopping %d process(es)",
                signal.Signals(signum).name,
                f"last.ckpt written at step {trainer.global_step}" if saved else "while testing",
                trainer.world_size,
            )
        raise StopSignalled(signum)  # on every rank at the same point: the way Lightning stops

    def _note_sigterm_under_ddp(self, trainer: pl.Trainer) -> None:
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            self._lightning_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        sig = self.requeue_signal
        handler = signal.getsignal(sig) if sig is not None else None
        if callable(handler) and handler != self._hold:
            self._handed_on = handler
            signal.signal(sig, self._hold)
        self._noted, self._pressed = 0, False
        self._note_sigterm_under_ddp(trainer)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._says = trainer.is_global_zero
            self._int_handler = signal.default_int_handler
            signal.signal(signal.SIGINT, self._note_interrupt)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hand_on(trainer)
        self._release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()  # the run is stopping; the handlers are back for what follows

    # Testing (train.py tests after fitting): SIGTERM stops at a test batch's end, the last
    # one included (Lightning's own check skips it and would score the whole split). Under
    # DDP it is noted and agreed there, as while fitting (every process has the same number
    # of test batches), so Lightning's broadcast inside its handler cannot meet the
    # embeddings' gather. Nothing is saved: training has finished. A Ctrl-C is Lightning's.
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._noted = 0
            self._note_sigterm_under_ddp(trainer)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        stop = self._stop_agreed(trainer)  # DDP: every rank, every test batch
        if stop:
            self._stop_for(trainer, stop, saved=False)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    def _fitting(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == "fit" and not trainer.sanity_checking

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._fitting(trainer):
            return
        every = self.every_n_train_steps
        step = trainer.global_step
        # An unchanged global_step means gradient accumulation: no optimizer step yet.
        if every and step % every == 0 and step != self._step_saved:
            self._step_saved = step
            self._save(trainer)
        stop = self._stop_agreed(trainer)  # DDP: every rank, every batch
        if (stop or self._held is not None) and step != self._step_saved:
            self._step_saved = step
            # A stop reaches every rank here together (DDP) or there is one process; a
            # requeue signal may have reached rank 0 alone.
            self._save(trainer, barrier=bool(stop))
        self._hand_on(trainer)
        if stop:
            self._stop_for(trainer, stop)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._fitting(trainer):
            return
        self._save(trainer)
        self._hand_on(trainer)
        stop = self._stop_agreed(trainer)
        if stop:
            self._stop_for(trainer, stop)  # got during validation: stop at the epoch's save


class DivergenceError(SiameseError, ArithmeticError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""


# Mean distance of an embedding to the centre of all of them, relative to the mean norm,
# below which the embedding counts as collapsed (every pair looks the same).
COLLAPSE_SPREAD = 1e-3


class DivergenceGuard(Callback):
    """Stop at the first non-finite loss or gradient, and warn once about a collapse.

    The loss is checked as the backward pass starts and the gradients before each optimizer
    step (left to the gradient scaler under 16-bit mixed precision, which skips such steps
    by design). On the CPU every step is checked at once, so the bad update is never
    applied. On a GPU the checks are recorded on the device and read every
    ``check_every_n_steps`` steps (reading one back would stall the GPU at every step), and
    always before validation and before any checkpoint is written: a checkpoint never holds
    weights that went non-finite, so ``checkpoints/last.ckpt`` stays the last good one. The
    step, the value and the learning rate are reported exactly either way.

    After each validation epoch the embeddings of the split are measured: when they sit on
    one point (mean distance to their centre under ``COLLAPSE_SPREAD`` times their mean
    norm) every distance is near zero, and a warning says so, once a run.

    Args:
        check_every_n_steps: on a GPU, read the recorded checks back every this many steps.
        warn_collapse: warn when the validation embeddings collapse.
    """

    def __init__(self, check_every_n_steps: int = 50, warn_collapse: bool = True) -> None:
        super().__init__()
        if not is_positive_int(check_every_n_steps):
            raise ConfigError(
                "callbacks.divergence_guard.check_every_n_steps must be a positive int, got "
                f"{check_every_n_steps!r}"
            )
        self.check_every_n_steps = int(check_every_n_steps)
        self.warn_collapse = warn_collapse
        self._collapse_warned = False
        self._reset()

    def _reset(self) -> None:
        # On the device: the first bad step (-1: none yet), what went bad (0 loss, 1
        # gradient), its loss and its learning rate.
        self._first: Tensor | None = None
        self._what: Tensor | None = None
        self._loss: Tensor | None = None
        self._lr: Tensor | None = None
        self._pending_loss: Tensor | None = None

    # -- recording -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        self._pending_loss = loss.detach()
        # Under a gradient scaler the loss arrives scaled: finite exactly when the loss is,
        # and only reported when it is not (so no unscaling, which would read the scale).
        if pl_module.automatic_optimization:
            return  # recorded with the gradients, before the optimizer step
        self._record(trainer, pl_module, self._pending_loss, None, trainer.global_step + 1)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        # Under a gradient scaler inf gradients are routine (it skips that step and lowers
        # its scale): only the loss counts there.
        if getattr(trainer.precision_plugin, "scaler", None) is not None or not grads:
            grad_norm = None
        else:  # the total norm carries any NaN or inf through
            grad_norm = grad_total(grads)
        # The head's rate when a backbone has its own group (model.backbone_lr_mult).
        lr = optimizer.param_groups[-1]["lr"]
        self._record(trainer, pl_module, self._pending_loss, grad_norm, trainer.global_step + 1, lr)

    def _record(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loss: Tensor | None,
        grad_norm: Tensor | None,
        step: int,
        lr: float | None = None,
    ) -> None:
        device = pl_module.device
        if loss is None and grad_norm is None:
            return
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.int64, device=device)
            self._what = torch.zeros((), dtype=torch.int64, device=device)
            self._loss = torch.zeros((), dtype=torch.float32, device=device)
            self._lr = torch.zeros((), dtype=torch.float64, device=device)
        loss_bad = (
            ~torch.isfinite(loss.float()).all()
            if loss is not None
            else torch.zeros((), dtype=torch.bool, device=device)
        )
        grad_bad = (
            ~torch.isfinite(grad_norm)
            if grad_norm is not None
            else torch.zeros((), dtype=torch.bool, device=device)
        )
        new = (loss_bad | grad_bad) & (self._first < 0)
        # All on the device: nothing is read back here.
        self._first = torch.where(new, torch.full_like(self._first, step), self._first)
        self._what = torch.where(new, grad_bad & ~loss_bad, self._what.bool()).long()
        if loss is not None:
            value = loss.detach().float().reshape(-1)[0]
            self._loss = torch.where(new, value, self._loss)
        if lr is not None:
            self._lr = torch.where(new, torch.full_like(self._lr, float(lr)), self._lr)
        if reads_are_free(device) or step % self.check_every_n_steps == 0:
            self.check(trainer)

    # -- checking --------------------------------------------------------------------------
    def check(self, trainer: pl.Trainer) -> None:
        """Raise DivergenceError if a non-finite loss or gradient has been recorded."""
        if self._first is None:
            return
        first = int(self._first)  # the only read back from the device
        if first < 0:
            return
        what = "gradient" if int(self._what) else "loss"
        loss = float(self._loss)
        lr = float(self._lr)
        self._reset()
        raise DivergenceError(divergence_message(trainer, first, what, loss, lr))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.check(trainer)  # raising here leaves the file on disk as it was

    # -- collapse --------------------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.warn_collapse or self._collapse_warned or trainer.sanity_checking:
            return
        ev = _last_eval(pl_module, "val")
        if ev is None or len(ev.embeddings) < 2:
            return
        spread, scale = embedding_spread(ev.embeddings)
        if spread <= COLLAPSE_SPREAD * scale or spread < 1e-12:
            self._collapse_warned = True
            if trainer.is_global_zero:
                log.warning(
                    "embedding collapse at epoch %d: the %d validation embeddings sit on one "
                    "point (mean distance to their centre %.3g, mean norm %.3g), so every "
                    "pair looks the same; lower optimizer.lr, check the loss margin, or try "
                    "another loss (loss=multi_similarity)",
                    trainer.current_epoch,
                    len(ev.embeddings),
                    spread,
                    scale,
                )


def grad_total(grads: list[Tensor]) -> Tensor:
    """One number that is finite only if every gradient is: their total 2-norm (a fused
    kernel per device and dtype where torch has ``get_total_norm``), else a sum."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, norm_type=2.0).float()
    return torch.stack([g.float().sum() for g in grads]).sum()


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a value back from ``device`` costs nothing (no queue to stall)."""
    return device.type == "cpu"


def embedding_spread(embeddings: Tensor) -> tuple[float, float]:
    """(mean distance of the rows to their centre, mean row norm) of (N, D) embeddings."""
    emb = embeddings.detach().double()
    spread = (emb - emb.mean(dim=0)).norm(dim=1).mean()
    return float(spread), float(emb.norm(dim=1).mean())


def divergence_message(trainer: pl.Trainer, step: int, what: str, loss: float, lr: float) -> str:
    """The one line a diverged run ends with: where, what, why, and what is kept."""
    value = (
        f"the loss is {loss:g}" if what == "loss" else f"a gradient is not finite (loss {loss:g})"
    )
    last = _last_checkpoint(trainer)
    kept = (
        f"the last good checkpoint is kept: {last} (resume with ckpt_path=last)"
        if last
        else "no checkpoint had been written yet"
    )
    lr_text = f"the learning rate {lr:g}" if lr > 0 else "the learning rate"
    lower = f" (e.g. optimizer.lr={lr / 10:g})" if lr > 0 else ""
    return (
        f"training diverged at optimizer step {step} (epoch {trainer.current_epoch}): {value}; "
        f"{lr_text} is probably too high: lower optimizer.lr{lower} or set "
        f"trainer.gradient_clip_val=1.0 (trainer.detect_anomaly=true names the operation "
        f"that made it); {kept}"
    )


def _last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest checkpoint written so far: last.ckpt, else the best one."""
    for key in ("last_model_path", "best_model_path"):
        for callback in trainer.checkpoint_callbacks:
            path = getattr(callback, key, "")
            if path and Path(path).is_file():
                return path
    return None


class DashboardPlots(Callback):
    """Pictures of the evaluated split for TensorBoard, W&B and the run directory.

    Drawn after validation on every ``every_n_epochs``-th epoch, after the last validation
    of ``fit`` (whatever stopped it) and after ``test``, on global rank zero only:

    - ``pairs``: sample pairs and their distances (after validation in ``fit``: pairs from
      the first training batch of the epoch, augmented, embedded in eval mode; otherwise
      balanced pairs of the evaluated split), framed green where the verification
      threshold decides them right;
    - ``distances``: histograms of same-pair and different-pair distances;
    - ``roc``: the ROC curve with the threshold's operating point;
    - ``embeddings_2d``: a 2-D projection of up to ``max_points`` embeddings by class;
    - ``retrieval``: ``max_queries`` fixed queries and their ``top_k`` nearest neighbours
      (leave-one-out over the split).

    Each is written to ``<save_dir>/<folder>/<name>.png``, where the folder is
    ``val_epoch<NNN>`` (NNN = epochs completed when validation ran, from 001) or ``test``,
    and logged under the key ``<stage>/plots/<name>``: TensorBoard ``add_image`` and W&B
    images at the trainer's global step. After the last validation of ``fit`` and after
    ``test`` TensorBoard also gets the embedding projector (up to ``max_points`` evenly
    spaced embeddings with their images as sprites, tag = stage), and W&B a table
    ``<stage>/plots/neighbours`` of the queries with their neighbours.

    Pictures that need the split's images are skipped (with a warning) when the split was
    evaluated in part (``limit_val_batches``/``limit_test_batches``).

    Args:
        every_n_epochs: draw after the validation of every n-th epoch.
        max_points: embeddings in the 2-D projection and in the TensorBoard projector.
        max_queries: queries in the retrieval grid and the W&B table.
        top_k: neighbours shown per query (at most ``MAX_TOP_K``, 20: more is capped, with a
            warning).
        num_pairs: pairs in the pair grid.
        projection: ``pca`` (cheap) or ``tsne`` (scikit-learn, slower).
        projector: send the embeddings to TensorBoard's projector.
        save_dir: folder of the PNG files; None: ``<trainer.default_root_dir>/plots``.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        max_points: int = 2000,
        max_queries: int = 8,
        top_k: int = 5,
        num_pairs: int = 8,
        projection: str = "pca",
        projector: bool = True,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        for key, value, example in (
            ("every_n_epochs", every_n_epochs, 5),
            ("max_points", max_points, 2000),
            ("max_queries", max_queries, 8),
            ("top_k", top_k, 5),
            ("num_pairs", num_pairs, 8),
        ):
            if not is_positive_int(value):
                raise ConfigError(
                    f"callbacks.plots.{key}={value!r} is not allowed; expected a positive "
                    f"integer, e.g. {example}"
                )
        if projection not in PROJECTIONS:
            raise ConfigError(
                f"callbacks.plots.projection={projection!r} is not supported; expected one "
                f"of {', '.join(PROJECTIONS)}"
            )
        self.every_n_epochs = int(every_n_epochs)
        self.max_points = int(max_points)
        self.max_queries = int(max_queries)
        self.top_k = min(int(top_k), MAX_TOP_K)
        if top_k > MAX_TOP_K and rank_zero_only.rank == 0:
            log.warning(
                "callbacks.plots.top_k=%d: showing %d neighbours per query, the most a "
                "retrieval row shows legibly (%d rows of up to %d thumbnails would take "
                "minutes to draw); set callbacks.plots.top_k=%d or less to silence this",
                top_k,
                MAX_TOP_K,
                self.max_queries,
                top_k,
                MAX_TOP_K,
            )
        self.num_pairs = int(num_pairs)
        self.projection = projection
        self.projector = bool(projector)
        self.save_dir = save_dir
        self._train_pairs: tuple[Tensor, Tensor, Tensor] | None = None
        self._val_epoch = 0  # epochs completed at the last validation
        self._drawn: Any = None  # the last EvalOutputs drawn
        self._warned: set[str] = set()

    # -- hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_pairs, self._val_epoch, self._drawn = None, 0, None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0 and trainer.is_global_zero:
            self._train_pairs = self._pick_train_pairs(batch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._val_epoch = trainer.current_epoch + 1
        ev = _last_eval(pl_module, "val")
        if ev is None:
            return
        if trainer.state.fn != "fit":  # trainer.validate: that is the end
            self._draw(trainer, pl_module, ev, final=True)
        elif self._val_epoch % self.every_n_epochs == 0:
            self._draw(trainer, pl_module, ev, final=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ev = _last_eval(pl_module, "val")
        # The last validation, whether max_epochs, max_steps or a callback stopped fit (none
        # ran past the sanity check when _val_epoch is 0).
        if ev is not None and self._val_epoch > 0:
            self._draw(trainer, pl_module, ev, final=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ev = _last_eval(pl_module, "test")
        if ev is not None:
            self._draw(trainer, pl_module, ev, final=True)

    # -- drawing ---------------------------------------------------------------------------
    def _pick_train_pairs(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``num_pairs`` pairs of a training batch, same pairs first, copied to the CPU."""
        if len(batch) == 3:
            x1, x2, same = batch
            same = same.bool().cpu()
            where_same, where_diff = same.nonzero().squeeze(1), (~same).nonzero().squeeze(1)
            # Half and half where the batch allows, topped up from the other kind.
            n_diff = min(len(where_diff), self.num_pairs // 2)
            n_same = min(len(where_same), self.num_pairs - n_diff)
            n_diff = min(len(where_diff), self.num_pairs - n_same)
            first = second = torch.cat([where_same[:n_same], where_diff[:n_diff]])
        else:
            images, labels = batch
            x1 = x2 = images
            pairs = sample_pairs(labels, self.num_pairs, _SEED)
            order = torch.argsort((~pairs.same).to(torch.uint8), stable=True)
            first, second, same = pairs.first[order], pairs.second[order], pairs.same[order]
        # Augmentation may overshoot [0, 1] by interpolation; the grid shows pixels as seen.
        return (
            x1[first.to(x1.device)].detach().float().clamp(0, 1).cpu(),
            x2[second.to(x2.device)].detach().float().clamp(0, 1).cpu(),
            same[first] if len(batch) == 3 else same,
        )

    def _draw(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ev: Any, final: bool
    ) -> None:
        stage, step = ev.stage, trainer.global_step
        split = self._split_images(trainer, ev)
        names = _class_names(ev.labels, split)
        emb = ev.embeddings.float()
        if self._drawn is not ev:
            self._drawn = ev
            folder = "test" if stage == "test" else f"val_epoch{self._val_epoch:03d}"
            out_dir = Path(self.save_dir or Path(trainer.default_root_dir) / "plots") / folder
            figures = self._figures(trainer, pl_module, ev, split, names, emb)
            self._publish(trainer, stage, step, out_dir, figures)
        if not final or split is None:
            return
        if self.projector:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    self._add_projector(logger, stage, step, emb, names, split)
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            columns, rows = self._neighbour_table(pl_module, emb, names, split)
            for logger in wandb_loggers:
                logger.log_table(f"{stage}/plots/neighbours", columns, rows, step=step)

    def _figures(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        ev: Any,
        split: Any,
        names: np.ndarray,
        emb: Tensor,
    ) -> dict[str, Figure]:
        threshold = _threshold(pl_module, ev)
        figures: dict[str, Figure] = {}
        pairs = self._pairs(trainer, pl_module, ev, split, emb)
        if pairs is not None:
            x1, x2, dist, same, title = pairs
            figures["pairs"] = pair_grid_figure(
                x1, x2, dist, same, threshold=threshold, max_pairs=self.num_pairs, title=title
            )
        figures["distances"] = distance_histograms_figure(
            ev.distances, ev.same, threshold=threshold
        )
        figures["roc"] = roc_figure(ev.distances, ev.same, threshold=threshold)
        figures["embeddings_2d"] = embeddings_2d_figure(
            emb, names, method=self.projection, max_points=self.max_points, seed=_SEED
        )
        if split is not None and len(emb) >= 2:
            queries, nb, nb_dist = self._retrieve(pl_module, emb)
            shown, slot = np.unique(nb, return_inverse=True)
            q_images, _ = split.__getitems__(queries.tolist())
            g_images, _ = split.__getitems__(shown.tolist())
            figures["retrieval"] = retrieval_grid_figure(
                q_images.float().clamp(0, 1),
                names[queries],
                g_images.float().clamp(0, 1),
                names[shown],
                slot.reshape(nb.shape),
                max_queries=len(queries),
                distances=nb_dist,
            )
        return figures

    def _pairs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ev: Any, split: Any, emb: Tensor
    ) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray, str] | None:
        """Pairs for the grid: the epoch's training pairs in fit, else pairs of the split."""
        if ev.stage == "val" and trainer.state.fn == "fit" and self._train_pairs is not None:
            x1, x2, same = self._train_pairs
            dist = pl_module.compare(x1, x2).float().cpu().numpy()
            title = f"training pairs (augmented), epoch {self._val_epoch}"
            return x1, x2, dist, same.numpy(), title
        if split is None:
            return None
        pairs = sample_pairs(ev.labels, self.num_pairs, _SEED)
        order = torch.argsort((~pairs.same).to(torch.uint8), stable=True)
        first, second, same = pairs.first[order], pairs.second[order], pairs.same[order]
        dist = _distances(pl_module, emb[first], emb[second])
        x1, _ = split.__getitems__(first.tolist())
        x2, _ = split.__getitems__(second.tolist())
        title = f"{ev.stage} pairs"
        return x1.float().clamp(0, 1), x2.float().clamp(0, 1), dist, same.numpy(), title

    def _retrieve(
        self, pl_module: pl.LightningModule, emb: Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fixed queries, their ``top_k`` nearest other items (Q, k) and distances (Q, k)."""
        n = len(emb)
        queries = np.sort(
            np.random.default_rng(_SEED).choice(n, min(self.max_queries, n), replace=False)
        )
        k = min(self.top_k, n - 1)
        x = emb.numpy().astype(np.float32)
        index = build_index(x, metric=pl_module.distance.faiss_metric)
        # Queries are in the gallery: search one more and drop each query's own entry.
        _, found = index.search(x[queries], k + 1)
        nb = np.empty((len(queries), k), dtype=np.int64)
        for row, (own, ids) in enumerate(zip(queries, found, strict=True)):
            ids = ids[(ids >= 0) & (ids != own)]
            nb[row] = ids[:k] if len(ids) >= k else np.resize(ids, k)
        q = emb[torch.from_numpy(np.repeat(queries, k))]
        dist = _distances(pl_module, q, emb[torch.from_numpy(nb.reshape(-1))]).reshape(nb.shape)
        return queries, nb, dist

    def _publish(
        self,
        trainer: pl.Trainer,
        stage: str,
        step: int,
        out_dir: Path,
        figures: dict[str, Figure],
    ) -> None:
        """Each figure as a PNG file, a TensorBoard image and a W&B image, then freed."""
        out_dir.mkdir(parents=True, exist_ok=True)
        media: dict[str, Any] = {}
        for name, fig in figures.items():
            rgb = figure_to_rgb(fig)  # (H, W, 3) uint8, rendered once
            fig.clear()
            path = out_dir / f"{name}.png"
            imsave(path, rgb, format="png")
            key = f"{stage}/plots/{name}"
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(key, rgb, step, dataformats="HWC")
            media[key] = path
        figures.clear()
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            import wandb

            # One history row per stage, on Lightning's trainer/global_step axis.
            images = {key: wandb.Image(str(path)) for key, path in media.items()}
            for logger in wandb_loggers:
                logger.log_metrics(images, step=step)

    def _add_projector(
        self,
        logger: TensorBoardLogger,
        stage: str,
        step: int,
        emb: Tensor,
        names: np.ndarray,
        split: Any,
    ) -> None:
        n = len(emb)
        m = min(self.max_points, n)
        idx = np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))  # evenly spaced
        images, _ = split.__getitems__(idx.tolist())
        logger.experiment.add_embedding(
            emb[torch.from_numpy(idx)],
            metadata=[str(v) for v in names[idx]],
            label_img=_thumbnails(images.float().clamp(0, 1), len(idx)),
            global_step=step,
            tag=stage,
        )

    def _neighbour_table(
        self, pl_module: pl.LightningModule, emb: Tensor, names: np.ndarray, split: Any
    ) -> tuple[list[str], list[list[Any]]]:
        """W&B table: one row per query, with each neighbour's image, label, distance, hit."""
        import wandb

        queries, nb, dist = self._retrieve(pl_module, emb)
        k = nb.shape[1]
        columns = ["query", "query_label", "hits"]
        for r in range(1, k + 1):
            columns += [f"neighbour_{r}", f"label_{r}", f"distance_{r}", f"hit_{r}"]
        q_images, _ = split.__getitems__(queries.tolist())
        shown, slot = np.unique(nb, return_inverse=True)
        g_images, _ = split.__getitems__(shown.tolist())
        g_pixels = [wandb.Image(_uint8(img)) for img in g_images]
        slot = slot.reshape(nb.shape)
        rows = []
        for row, q in enumerate(queries):
            hits = [bool(names[g] == names[q]) for g in nb[row]]
            cells: list[Any] = [wandb.Image(_uint8(q_images[row])), str(names[q]), sum(hits)]
            for j, g in enumerate(nb[row]):
                cells += [g_pixels[slot[row, j]], str(names[g]), float(dist[row, j]), hits[j]]
            rows.append(cells)
        return columns, rows

    def _split_images(self, trainer: pl.Trainer, ev: Any) -> Any:
        """The images of the evaluated rows (row i's image at i), else None."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "load_splits"):
            return None
        split = getattr(datamodule.load_splits(), ev.stage)
        if ev.items is not None and len(ev.items) == len(ev.embeddings):
            # Part of a split (trainer.limit_*_batches) is still matched to its own images.
            return split if len(ev.items) == len(split) else split.subset(ev.items)
        if ev.stage not in self._warned:
            self._warned.add(ev.stage)
            log.warning(
                "callbacks.plots: the %s loader gave no item indices, so pictures that need "
                "the %s images are skipped",
                ev.stage,
                ev.stage,
            )
        return None


def _last_eval(pl_module: pl.LightningModule, stage: str) -> Any:
    ev = getattr(pl_module, "last_eval", None)
    return ev if ev is not None and ev.stage == stage and len(ev.embeddings) > 0 else None


def _threshold(pl_module: pl.LightningModule, ev: Any) -> float | None:
    """The calibrated threshold (from validation), else the split's own best one."""
    for value in (getattr(pl_module, "threshold", None), ev.metrics.get("threshold")):
        if value is not None and math.isfinite(float(value)):
            return float(value)
    return None


@torch.no_grad()
def _distances(pl_module: pl.LightningModule, a: Tensor, b: Tensor) -> np.ndarray:
    """The module's Φ between embedding rows, lower means more alike, as numpy."""
    distance = pl_module.distance
    a, b = a.to(pl_module.device), b.to(pl_module.device)
    return distance.to_distance(distance.paired(a, b)).float().cpu().numpy()


def _class_names(labels: Tensor, split: Any) -> np.ndarray:
    """Class names of the labels where the split names its classes, else the labels."""
    y = labels.cpu().numpy()
    classes = getattr(split, "classes", None)
    if classes is not None and len(y) and 0 <= y.min() and y.max() < len(classes):
        return np.asarray([str(c) for c in classes], dtype=object)[y]
    return y


def _thumbnails(images: Tensor, n: int) -> Tensor:
    """Images shrunk so that ``n`` of them fit one sprite sheet (and at most 64 pixels)."""
    per_side = math.ceil(math.sqrt(n))
    side = min(_THUMBNAIL_MAX, _SPRITE_SIDE // per_side)
    h, w = images.shape[-2:]
    if max(h, w) <= side:
        return images
    scale = side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images, size=size, mode="area")


def _uint8(image: Tensor) -> np.ndarray:
    """A (C, H, W) image in [0, 1] as (H, W) or (H, W, 3) uint8 pixels for wandb.Image."""
    x = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
