"""Fine-tuning a pretrained backbone: frozen for the first epochs, then trained (a callback).

``BackboneFreeze`` is Lightning's ``BackboneFinetuning`` for a siamese tower. The backbone's
parameters sit in the optimizer from the start, in the group ``model.backbone_lr_mult``
gives them; no group is added mid-run, so a one-cycle schedule keeps its plan and a resumed
run finds the optimizer it saved.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BackboneFinetuning
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from siamese.checks import is_int
from siamese.errors import ConfigError

log = logging.getLogger(__name__)


class BackboneFreeze(BackboneFinetuning):
    """Keep the tower's backbone frozen for the first ``unfreeze_at_epoch`` epochs (only the
    embedding head trains), then train it at ``model.backbone_lr_mult`` x the learning rate.

    On one process the backbone is frozen as Lightning freezes it (``requires_grad=False``:
    no backward pass through it). Under DDP, whose gradient synchronisation covers only the
    parameters that required gradients when it wrapped the model, the backbone keeps them
    and its gradients are dropped before each optimizer step instead (the optimizer skips a
    parameter without a gradient: no update, no weight decay, no moment).

    Args:
        unfreeze_at_epoch: the first epoch the backbone trains in; 0 turns the callback off.
        train_bn: keep training the backbone's BatchNorm layers (scale, shift and running
            statistics) while it is frozen, as Lightning's default; false freezes them too.
        verbose: log a line when the backbone starts training.
    """

    def __init__(self, unfreeze_at_epoch: int = 0, train_bn: bool = True, verbose: bool = True):
        if not is_int(unfreeze_at_epoch) or unfreeze_at_epoch < 0:
            raise ConfigError(
                f"callbacks.backbone_freeze.unfreeze_at_epoch={unfreeze_at_epoch!r} must be an "
                "integer >= 0 (the first epoch the backbone trains in; 0: never frozen)"
            )
        if not isinstance(train_bn, bool):
            raise ConfigError(
                f"callbacks.backbone_freeze.train_bn must be true or false, got {train_bn!r}"
            )
        super().__init__(unfreeze_backbone_at_epoch=unfreeze_at_epoch, train_bn=train_bn)
        self.announce = bool(verbose)
        self.frozen = False
        self._drop_grads = False

    @property
    def active(self) -> bool:
        return self.unfreeze_backbone_at_epoch > 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.active or stage != "fit":
            return
        if getattr(pl_module, "backbone", None) is None:
            tower = type(getattr(pl_module, "tower", pl_module)).__name__
            raise ConfigError(
                f"callbacks.backbone_freeze.unfreeze_at_epoch={self.unfreeze_backbone_at_epoch} "
                f"needs a tower with a backbone (model=timm or model=resnet18), but this run's "
                f"is {tower}; set it to 0"
            )
        self._drop_grads = trainer.world_size > 1
        super().setup(trainer, pl_module, stage)  # -> freeze_before_training

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's puts back the parameter groups it added: this one adds none (the
        # optimizer restored from a checkpoint is already right).
        return

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.frozen = True
        backbone = pl_module.backbone
        if not self._drop_grads:
            self.freeze(backbone, train_bn=self.train_bn)
        elif not self.train_bn:  # statistics only: the parameters keep requires_grad
            for module in backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.track_running_stats = False

    def finetune_function(
        self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer
    ) -> None:
        if not self.frozen or epoch < self.unfreeze_backbone_at_epoch:
            return
        self.make_trainable(pl_module.backbone)
        self.frozen = False
        if self.announce:
            mult = getattr(pl_module, "backbone_lr_mult", 1.0)
            log.info(
                "backbone: trainable from epoch %d, at %g x the learning rate "
                "(model.backbone_lr_mult)",
                epoch,
                mult,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed mid-epoch gets no epoch start (Lightning skips it): unfreeze here when
        # the epoch it resumes in is past the frozen ones.
        if self.active:
            for optimizer in trainer.optimizers:
                self.finetune_function(pl_module, trainer.current_epoch, optimizer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active:
            for optimizer in trainer.optimizers:
                self.finetune_function(pl_module, trainer.current_epoch, optimizer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not (self.frozen and self._drop_grads):
            return
        for module in pl_module.backbone.modules():
            if self.train_bn and isinstance(module, _BatchNorm):
                continue
            for param in module.parameters(recurse=False):
                param.grad = None
