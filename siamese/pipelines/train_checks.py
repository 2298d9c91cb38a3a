"""Training's start checks: a config that cannot train fails in one line before any data is read."""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from siamese.checks import check_int_setting, is_int, is_number
from siamese.config import build
from siamese.data.datamodule import image_size_pair
from siamese.distances import check_embedding_dim
from siamese.errors import ConfigError
from siamese.losses import PairLoss
from siamese.metric_names import EVAL_METRICS, TRAIN_METRICS
from siamese.models.towers import check_tower_settings
from siamese.module import TRAIN_EPOCH_LOGS, scheduler_kwargs
from siamese.sweeps import check_optimized_metric

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Fail at start, in one sentence, on combinations that cannot train."""
    loss = build(cfg.loss, distance=build(cfg.distance))  # raises on bce+euclidean
    check_embedding_dim(loss.distance, cfg.model.get("embedding_dim"))
    if cfg.data.get("pair_mode") == "explicit" and not isinstance(loss, PairLoss):
        raise ConfigError(
            f"{type(loss).__name__} learns from whole class-balanced batches and cannot use "
            "data.pair_mode=explicit; use data.pair_mode=in_batch, or loss=contrastive"
        )
    check_int_setting("eval_pairs", cfg.get("eval_pairs", 1), 2)
    every = (cfg.get("checkpoints") or {}).get("every_n_train_steps")
    if every is not None:
        check_int_setting("checkpoints.every_n_train_steps", every, 1, " or null")
    check_optimized_metric(cfg.get("optimized_metric"))
    check_optimization(cfg.optimizer, cfg.get("scheduler"))
    if cfg.get("seed") is not None:  # null: the run is not seeded
        check_seed("seed", cfg.seed, SEED_MAX)
    check_seed("eval_seed", cfg.get("eval_seed", 0), EVAL_SEED_MAX)
    # The tower and the data module are built after the data is read; their settings that
    # need no data are checked now, by the same code (the augment's own constructor).
    # A resumed run's weights come from its checkpoint, not from model.weights or a cache.
    check_tower_settings(cfg.model, resuming=bool(cfg.get("ckpt_path")))
    if cfg.data.get("augment") is not None:
        build(cfg.data.augment)
    check_monitors(cfg.get("callbacks"))


# What pl.seed_everything accepts (numpy's seed range).
SEED_MAX = 2**32 - 1
# What torch.Generator.manual_seed accepts (the evaluation pairs; the one-shot episodes'
# numpy generator takes any non-negative integer).
EVAL_SEED_MAX = 2**64 - 1


def check_seed(key: str, value: Any, top: int) -> None:
    """Refuse a seed that a generator would refuse later (``seed`` when the run is seeded,
    ``eval_seed`` at the first one-shot test, after training)."""
    if not is_int(value) or not 0 <= value <= top:
        shown = "null" if value is None else repr(value)
        raise ConfigError(
            f"{key}={shown} is not a seed; use an integer from 0 to {top}, e.g. {key}=0"
        )


def fit_metric_names() -> list[str]:
    """What a callback can monitor while fitting: the ``val/`` and ``train/`` metrics the
    module logs (test/ ones come after the fit) and Lightning's own ``epoch`` and ``step``."""
    train = dict.fromkeys((*TRAIN_METRICS, *TRAIN_EPOCH_LOGS, "loss_step"))
    return [*(f"val/{n}" for n in EVAL_METRICS), *(f"train/{n}" for n in train), "epoch", "step"]


def check_monitors(callbacks_cfg: DictConfig | None) -> None:
    """Refuse a callback ``monitor`` (ModelCheckpoint, EarlyStopping) that the fit never
    logs, naming the closest: Lightning finds out only after the first epoch."""
    names = fit_metric_names()
    for key, callback in (callbacks_cfg or {}).items():
        monitor = callback.get("monitor") if isinstance(callback, DictConfig) else None
        if monitor is None or monitor in names:
            continue
        close = difflib.get_close_matches(str(monitor), names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"callbacks.{key}.monitor={monitor!r} is not a metric this run logs while fitting; "
            f"{hint}choose one of: {', '.join(names)}"
        )


# Learning rates a schedule moves between, each with whether 0 is allowed, what it is and
# an example: torch builds a one-cycle schedule with a negative peak, or a cosine one that
# ends below zero, without a word.
SCHEDULE_RATES = {
    "max_lr": (False, "the one cycle's peak learning rate; by default optimizer.lr", "0.01"),
    "eta_min": (True, "the learning rate the cosine schedule ends at", "0"),
}


def check_schedule_rates(scheduler_cfg: DictConfig) -> None:
    """Refuse a negative (or, for a peak, zero) learning rate in the scheduler's settings."""
    for key, (zero_ok, what, example) in SCHEDULE_RATES.items():
        value = scheduler_cfg.get(key)
        if value is None:
            continue
        rates = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
        if not all(is_number(r) and (r >= 0 if zero_ok else r > 0) for r in rates):
            bound = ">= 0" if zero_ok else "positive"
            raise ConfigError(
                f"scheduler.{key}={value} must be {bound} ({what}); e.g. scheduler.{key}={example}"
            )


def check_optimization(optimizer_cfg: DictConfig, scheduler_cfg: DictConfig | None) -> None:
    """Build the optimizer (and scheduler) on one dummy parameter, so that a value torch
    refuses (``optimizer.lr=-1``, a one-cycle ``pct_start`` of 2) stops the run at start
    in one line naming the settings, not with a traceback from inside ``fit``."""
    for name, part in (("optimizer", optimizer_cfg), ("scheduler", scheduler_cfg)):
        if not part:
            continue
        if name == "scheduler":  # after the optimizer, whose lr max_lr defaults to
            check_schedule_rates(part)
        settings = ", ".join(
            f"{name}.{k}={v}" for k, v in part.items() if not str(k).startswith("_")
        )
        if not part.get("_partial_", False):
            raise ConfigError(
                f"{name} needs {name}._partial_=true: it is built later, given the "
                f"{'parameters' if name == 'optimizer' else 'optimizer'}"
            )
        try:
            make = build(part)
            if name == "optimizer":
                optimizer = make(params=[torch.nn.Parameter(torch.zeros(1))])
            else:  # as configure_optimizers builds it, for a fit of 100 steps
                make(optimizer, **scheduler_kwargs(make, 100))
        except Exception as exc:  # whatever the constructor raises, the settings caused
            cause = exc.__cause__ or exc  # Hydra wraps what the constructor raised
            reason = (str(cause).splitlines() or [type(cause).__name__])[0]
            raise ConfigError(
                f"{part.get('_target_', name)} refused its settings ({reason}); "
                f"fix one of: {settings}"
            ) from None


GPU_ACCELERATORS = ("gpu", "cuda")


def uses_gpu(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer will run on CUDA GPUs (``auto`` picks them when there are some)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator in GPU_ACCELERATORS or (
        accelerator == "auto" and torch.cuda.device_count() > 0
    )


def check_trainer(trainer_cfg: DictConfig) -> DictConfig:
    """Refuse devices that are not there; 16-bit mixed precision on a CPU becomes bf16.

    Returns the trainer config to build (a copy when the precision is changed).
    """
    check_training_length(trainer_cfg)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    gpus = torch.cuda.device_count()
    on_gpu = uses_gpu(trainer_cfg)
    if accelerator in GPU_ACCELERATORS and gpus == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible on this machine; "
            "use trainer.accelerator=cpu (or auto, which picks a GPU when there is one)"
        )
    if isinstance(devices, ListConfig | list | tuple):  # device ids: GPUs only
        ids = list(devices)
        if not on_gpu:
            raise ConfigError(
                f"trainer.devices={ids} lists device ids, which only GPUs take; on the CPU "
                "give a number of processes (e.g. trainer.devices=2)"
            )
        wrong = [d for d in ids if not is_int(d) or not 0 <= d < gpus]
        if wrong or not ids or len(set(ids)) != len(ids):
            raise ConfigError(
                f"trainer.devices={ids} must list distinct GPU ids from 0 to {gpus - 1} (this "
                f"machine has {gpus} GPUs); or give a count (e.g. trainer.devices={gpus})"
            )
    if is_int(devices):
        available = gpus if on_gpu else os.cpu_count() or 1
        kind = "GPUs" if on_gpu else "CPU cores"
        if devices == 0 or devices < -1:
            raise ConfigError(
                f"trainer.devices={devices} is not a number of devices; use 1 to "
                f"{available}, -1 (all {available} {kind}) or auto"
            )
        if devices > available:
            raise ConfigError(
                f"trainer.devices={devices} but this machine has {available} {kind}; use "
                f"trainer.devices={available} or fewer (or auto)"
            )
    check_int_setting("trainer.num_nodes", trainer_cfg.get("num_nodes", 1))
    precision = str(trainer_cfg.get("precision", "32-true"))
    if not on_gpu and precision in ("16-mixed", "16", "16-true"):
        log.warning(
            "trainer.precision=%s needs a GPU; training in bf16-mixed on the CPU instead", precision
        )
        trainer_cfg = OmegaConf.create(OmegaConf.to_container(trainer_cfg, resolve=True))
        trainer_cfg.precision = "bf16-mixed"
    return trainer_cfg


def check_training_length(trainer_cfg: DictConfig) -> None:
    """Refuse epoch, step and batch limits that Lightning takes but that make no finite fit
    of at least one step (the one-cycle and cosine schedules are planned over its steps),
    and a negative gradient clip, which Lightning ignores without a word."""
    steps = trainer_cfg.get("max_steps", -1)
    if not is_int(steps) or steps == 0 or steps < -1:
        raise ConfigError(
            f"trainer.max_steps={steps!r} must be a positive whole number of optimizer steps, "
            "or -1 for no step limit (trainer.max_epochs then ends the run)"
        )
    epochs = trainer_cfg.get("max_epochs")
    # (trainer.max_time also ends such a fit: left to Lightning, as a schedule-free run can
    # use it.)
    if epochs == -1 and steps == -1 and trainer_cfg.get("max_time") is None:
        raise ConfigError(
            "trainer.max_epochs=-1 (Lightning's no epoch limit) with trainer.max_steps=-1 "
            "would train forever, and the learning-rate schedule is planned over a fixed "
            "number of steps; set a number of epochs (e.g. trainer.max_epochs=20) or of "
            "steps (e.g. trainer.max_steps=5000)"
        )
    if epochs is not None and epochs != -1 and (not is_int(epochs) or epochs < 1):
        raise ConfigError(
            f"trainer.max_epochs={epochs!r} must be a positive whole number of epochs, e.g. "
            "trainer.max_epochs=20; for part of an epoch set trainer.max_steps or "
            "trainer.limit_train_batches"
        )
    limit = trainer_cfg.get("limit_train_batches")
    if limit is not None and not (
        (is_int(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit <= 1)
    ):
        why = "would train on no batches" if limit == 0 else "is not a number of batches"
        raise ConfigError(
            f"trainer.limit_train_batches={limit!r} {why}; give a number of batches (e.g. "
            "10), a fraction of them in (0, 1] (e.g. 0.25), or null for all"
        )
    clip = trainer_cfg.get("gradient_clip_val")
    if clip is not None and not (is_number(clip) and clip >= 0):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip!r} must be >= 0 (Lightning skips clipping "
            "silently for a negative value); e.g. trainer.gradient_clip_val=1.0, or null "
            "for no clipping"
        )


def planned_processes(trainer_cfg: DictConfig) -> int:
    """How many training processes Lightning will start: devices per node x num_nodes."""
    devices = trainer_cfg.get("devices", "auto")
    gpus = torch.cuda.device_count()
    on_gpu = uses_gpu(trainer_cfg)
    every = (gpus if on_gpu else os.cpu_count() or 1) or 1
    text = str(devices).strip()
    if isinstance(devices, bool):
        per_node = 1
    elif isinstance(devices, int):
        per_node = every if devices == -1 else devices
    elif not isinstance(devices, str):  # a list of device indices
        per_node = len(list(devices))
    elif text == "auto":  # every GPU, or one CPU process
        per_node = every if on_gpu else 1
    elif text == "-1":
        per_node = every
    elif "," in text:  # "0,1": those devices
        per_node = len([p for p in text.split(",") if p.strip()])
    else:
        per_node = int(text) if text.isdigit() else 1
    return max(1, per_node) * int(trainer_cfg.get("num_nodes", 1))


def check_augment_size(augment_cfg: Any, size: tuple[int, int]) -> None:
    """Refuse an augmentation that resizes training images away from the size validation,
    test and the model take (``data.augment.size``)."""
    got = image_size_pair((augment_cfg or {}).get("size"), "data.augment.size")
    if got is not None and got != tuple(size):
        raise ConfigError(
            f"data.augment.size={list(got)} would train on other images than the "
            f"{size[0]}x{size[1]} ones validation, test and the model take; leave "
            "data.augment.size=null (the crop is resized back to the data's size), or set "
            "data.image_size instead"
        )
