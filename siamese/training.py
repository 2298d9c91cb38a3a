"""Training pieces of the module: epoch statistics, optimizers, the LR plan, the resume check."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from siamese.config import build
from siamese.errors import ConfigError
from siamese.losses import LossOutput

# What train/ logs once an epoch: image-weighted means over the epoch's steps.
TRAIN_EPOCH_LOGS = ("loss_epoch", "active_fraction", "pos_distance", "neg_distance")


class EpochStats:
    """Image-weighted sums of one training epoch's step statistics (``TRAIN_EPOCH_LOGS``),
    kept on the device: adding a step reads nothing back. A step of another epoch starts
    the sums again, so sums restored from a checkpoint go on only within their own epoch."""

    def __init__(self) -> None:
        self.epoch = -1
        self.sums: Tensor | None = None
        self.images = 0

    def add(self, epoch: int, out: LossOutput, images: int) -> None:
        step = torch.stack(
            [
                out.loss.detach().float(),
                out.active_fraction.float(),
                out.pos_distance.float(),
                out.neg_distance.float(),
            ]
        )
        if epoch != self.epoch or self.sums is None:
            self.epoch, self.sums, self.images = epoch, step * images, images
        else:
            self.sums = self.sums.to(step.device) + step * images
            self.images += images

    def means(self, epoch: int) -> Tensor | None:
        """The means of ``epoch``'s steps, or None when none of its steps was added."""
        if epoch != self.epoch or self.sums is None or self.images == 0:
            return None
        return self.sums / self.images

    def state_dict(self) -> dict[str, Any]:
        sums = None if self.sums is None else self.sums.detach().cpu()
        return {"epoch": self.epoch, "sums": sums, "images": self.images}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.epoch = int(state.get("epoch", -1))
        self.sums = state.get("sums")
        self.images = int(state.get("images", 0))


def planned_steps(trainer: pl.Trainer) -> int:
    """Optimizer steps this fit will take: Lightning's ``estimated_stepping_batches``,
    computed from the data module's batch count when it has one. (Lightning's own
    estimate builds the training iterator and draws its first batch at once, before a
    resumed run has put the loader back where the checkpoint left it.)"""
    datamodule = trainer.datamodule
    count = getattr(datamodule, "train_batches_per_epoch", None)
    if trainer.max_epochs in (None, -1) or count is None:
        return int(trainer.estimated_stepping_batches)
    batches = count()
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None and float(limit) != 1.0:
        batches = int(batches * float(limit))
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
    return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps


def parameter_groups(
    module: nn.Module, backbone: nn.Module | None, lr_mult: float
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: for a tower with a backbone, the backbone's (its
    ``lr_mult`` scales the optimizer's lr) and the rest (named, so a dashboard's
    ``lr-AdamW/backbone`` and ``lr-AdamW/head`` do not depend on the multiplier); one
    group otherwise."""
    if backbone is None:
        return [{"params": list(module.parameters())}]
    inside = {id(p) for p in backbone.parameters()}
    return [
        {
            "params": [p for p in module.parameters() if id(p) in inside],
            "name": "backbone",
            "lr_mult": lr_mult,
        },
        {
            "params": [p for p in module.parameters() if id(p) not in inside],
            "name": "head",
            "lr_mult": 1.0,
        },
    ]


def make_optimizers(hparams: Any, groups: list[dict[str, Any]], steps: Callable[[], int]) -> Any:
    """The optimizer (and step-wise scheduler) of ``hparams.optimizer`` / ``scheduler`` over
    ``groups``, as ``configure_optimizers`` returns them; ``steps()`` plans the schedule."""
    make_optimizer = build(hparams.optimizer)
    lr = getattr(make_optimizer, "keywords", {}).get("lr")
    if len(groups) == 1:
        optimizer = make_optimizer(params=groups[0]["params"])
    else:
        if lr is None:
            raise ConfigError(
                "model.backbone_lr_mult needs optimizer.lr set (it scales it), e.g. "
                "optimizer.lr=0.001"
            )
        for group in groups:
            group["lr"] = float(lr) * group["lr_mult"]
        optimizer = make_optimizer(params=groups)
    if not hparams.scheduler:
        return optimizer
    make = build(hparams.scheduler)
    kwargs = scheduler_kwargs(make, steps())
    peak = getattr(make, "keywords", {}).get("max_lr")
    if len(groups) > 1 and isinstance(peak, int | float):  # one peak per group
        kwargs["max_lr"] = [float(peak) * g["lr_mult"] for g in optimizer.param_groups]
    scheduler = make(optimizer, **kwargs)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
    }


def state_difference(saved: dict[str, Any], own: dict[str, Any]) -> str | None:
    """The first difference between a checkpoint's tensors and a model's, in words (with
    their count), or None when every key and shape matches."""

    def shape(t: Any) -> str:
        return "x".join(str(n) for n in getattr(t, "shape", ())) or "scalar"

    not_tensors = [k for k, v in saved.items() if not isinstance(v, Tensor)]
    if not_tensors:
        return f"{not_tensors[0]} is {type(saved[not_tensors[0]]).__name__}, not a tensor"
    resized = [k for k in saved if k in own and tuple(saved[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    if not (resized or missing or extra):
        return None
    if resized:
        k = resized[0]
        first = f"{k} is {shape(saved[k])} there and {shape(own[k])} here"
    elif missing:
        first = f"{missing[0]} is not in it"
    else:
        first = f"it has {extra[0]}, which this model lacks"
    count = len(resized) + len(missing) + len(extra)
    return f"{first}; {count} tensor{'s differ' if count > 1 else ' differs'}"


def check_same_model(saved: dict[str, Any], own: dict[str, Any]) -> None:
    """Refuse to resume into a model whose tensors differ from the checkpoint's (another
    ``model.*``, ``distance`` or loss with parameters): one line naming the first
    difference, instead of torch's page of size mismatches."""
    difference = state_difference(saved, own)
    if difference is None:
        return
    raise ConfigError(
        f"the checkpoint holds another model ({difference}); resume with the run's own model, "
        "distance and loss settings (ckpt_path=last or auto reuses the run's own, saved in "
        "the checkpoint), or start a new run"
    )


def scheduler_kwargs(make: Callable[..., Any], steps: int) -> dict[str, Any]:
    """What a partial scheduler config gets besides the optimizer: ``total_steps`` or
    ``T_max`` = ``steps`` (the fit's optimizer steps) when it takes one and the config does
    not set it; and a one-cycle warm-up of exactly one step moved to two (torch divides by
    ``pct_start * total_steps - 1``: 0.2 x 5 steps in a quick check would crash it)."""
    keywords = getattr(make, "keywords", {})
    params = inspect.signature(getattr(make, "func", make)).parameters
    extra: dict[str, Any] = {
        name: steps for name in ("total_steps", "T_max") if name in params and name not in keywords
    }
    pct = keywords.get("pct_start")
    total = extra.get("total_steps", keywords.get("total_steps"))
    if pct is not None and total and float(pct) * total == 1.0 and total > 2:
        extra["pct_start"] = 2.0 / total
    return extra


def check_schedule_plan(checkpoint: dict[str, Any], steps: Callable[[], int]) -> None:
    """Refuse to resume a one-cycle schedule planned for another number of steps than
    ``steps()``: torch would fail deep inside, so say what to change instead."""
    for state in checkpoint.get("lr_schedulers", []):
        planned = state.get("total_steps")
        if planned is not None and planned != steps():
            raise ConfigError(
                f"the checkpoint's one-cycle LR schedule is planned for {planned} steps, "
                f"but this run plans {steps()}; resume "
                "with the run's own trainer.max_epochs and data.batch_size, or start a "
                "new run (init from the weights with siamese.load)"
            )
