"""``DivergenceGuard``: stop at the first non-finite loss or gradient, warn about a collapse."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from siamese.checks import is_positive_int
from siamese.errors import ConfigError, SiameseError

log = logging.getLogger(__name__)


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
    """The newest checkpoint written so far: last.ckpt (``save_last``'s, or the file of a
    ModelCheckpoint with no monitor, which saves whatever the score), else the best one."""
    callbacks = trainer.checkpoint_callbacks
    unmonitored = [c for c in callbacks if getattr(c, "monitor", "") is None]
    paths = [getattr(c, "last_model_path", "") for c in callbacks]
    paths += [getattr(c, "best_model_path", "") for c in [*unmonitored, *callbacks]]
    return next((path for path in paths if path and Path(path).is_file()), None)


def _last_eval(pl_module: pl.LightningModule, stage: str) -> Any:
    ev = getattr(pl_module, "last_eval", None)
    return ev if ev is not None and ev.stage == stage and len(ev.embeddings) > 0 else None
