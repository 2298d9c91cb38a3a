"""Training job: config -> data module, Siamese module, Trainer -> fit, test, metrics.json."""

from __future__ import annotations

import difflib
import logging
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from siamese.callbacks import is_positive_int, select_callbacks
from siamese.callbacks.signals import after_training_hint as _test_again_hint
from siamese.callbacks.signals import exit_on_stop_signal, sigterm_stops_outside_fit
from siamese.checkpointing import AtomicCheckpointIO, RunRelativePaths
from siamese.cli import resumable_checkpoint
from siamese.config import build
from siamese.data.datamodule import image_size_pair
from siamese.distances import check_embedding_dim
from siamese.distributed import SyncBatchNormPlugin
from siamese.errors import ConfigError, find_in_chain
from siamese.evaluation.oneshot import class_groups
from siamese.inference import check_checkpoint, not_a_checkpoint_file
from siamese.loggers import build_loggers
from siamese.losses import PairLoss
from siamese.metric_names import EVAL_METRICS, TEST_ONLY_METRICS, TRAIN_METRICS
from siamese.models.backbones import input_defaults, without_pretrained
from siamese.models.towers import check_tower_settings
from siamese.module import TRAIN_EPOCH_LOGS, SiameseModule, scheduler_kwargs
from siamese.pipelines.report import print_table, write_metrics
from siamese.registry import tower_class
from siamese.sweeps import check_optimized_metric

log = logging.getLogger(__name__)

# Reported after training (as test/<name>), in this order: what the module logs, less the
# loss and the mean pair distances.
REPORTED = (
    *(n for n in EVAL_METRICS if n not in ("loss", "pos_distance", "neg_distance")),
    *TEST_ONLY_METRICS,
)


def check_config(cfg: DictConfig) -> None:
    """Fail at start, in one sentence, on combinations that cannot train."""
    loss = build(cfg.loss, distance=build(cfg.distance))  # raises on bce+euclidean
    check_embedding_dim(loss.distance, cfg.model.get("embedding_dim"))
    if cfg.data.get("pair_mode") == "explicit" and not isinstance(loss, PairLoss):
        raise ConfigError(
            f"{type(loss).__name__} learns from whole class-balanced batches and cannot use "
            "data.pair_mode=explicit; use data.pair_mode=in_batch, or loss=contrastive"
        )
    if cfg.get("eval_pairs", 1) < 2:
        raise ConfigError(f"eval_pairs must be at least 2, got {cfg.eval_pairs}")
    every = (cfg.get("checkpoints") or {}).get("every_n_train_steps")
    if every is not None and not is_positive_int(every):
        raise ConfigError(
            f"checkpoints.every_n_train_steps must be a positive int or null, got {every!r}"
        )
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_seed(key: str, value: Any, top: int) -> None:
    """Refuse a seed that a generator would refuse later (``seed`` when the run is seeded,
    ``eval_seed`` at the first one-shot test, after training)."""
    if not _is_int(value) or not 0 <= value <= top:
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
        if not all(_is_number(r) and (r >= 0 if zero_ok else r > 0) for r in rates):
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
        wrong = [
            d for d in ids if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < gpus
        ]
        if wrong or not ids or len(set(ids)) != len(ids):
            raise ConfigError(
                f"trainer.devices={ids} must list distinct GPU ids from 0 to {gpus - 1} (this "
                f"machine has {gpus} GPUs); or give a count (e.g. trainer.devices={gpus})"
            )
    if isinstance(devices, int) and not isinstance(devices, bool):
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
    nodes = trainer_cfg.get("num_nodes", 1)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes must be a positive int, got {nodes!r}")
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
    if not _is_int(steps) or steps == 0 or steps < -1:
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
    if epochs is not None and epochs != -1 and (not _is_int(epochs) or epochs < 1):
        raise ConfigError(
            f"trainer.max_epochs={epochs!r} must be a positive whole number of epochs, e.g. "
            "trainer.max_epochs=20; for part of an epoch set trainer.max_steps or "
            "trainer.limit_train_batches"
        )
    limit = trainer_cfg.get("limit_train_batches")
    if limit is not None and not (
        (_is_int(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit <= 1)
    ):
        why = "would train on no batches" if limit == 0 else "is not a number of batches"
        raise ConfigError(
            f"trainer.limit_train_batches={limit!r} {why}; give a number of batches (e.g. "
            "10), a fraction of them in (0, 1] (e.g. 0.25), or null for all"
        )
    clip = trainer_cfg.get("gradient_clip_val")
    if clip is not None and not (_is_number(clip) and clip >= 0):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip!r} must be >= 0 (Lightning skips clipping "
            "silently for a negative value); e.g. trainer.gradient_clip_val=1.0, or null "
            "for no clipping"
        )


def build_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    """``pl.Trainer`` from ``trainer_cfg``. A value Lightning refuses (an unknown precision,
    accelerator or strategy name, devices it cannot use, a package it needs for them)
    becomes one ConfigError line with Lightning's own reason, not Hydra's report."""
    try:
        return build(trainer_cfg, **kwargs)
    except InstantiationException as exc:
        refused = find_in_chain(
            exc,
            lambda e: isinstance(
                e, MisconfigurationException | ValueError | TypeError | ImportError
            ),
        )
        if refused is None:
            raise
        reason = " ".join(str(refused).split())  # Lightning's message, on one line
        raise ConfigError(
            f"Lightning refused the trainer config: {reason} (set by trainer.* overrides or "
            "conf/trainer/*.yaml)"
        ) from exc


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


def last_checkpoint(output_dir: Path) -> Path:
    """The run directory's ``last.ckpt`` (callbacks.last_checkpoint), what ``ckpt_path=last``
    resumes from."""
    return output_dir / "checkpoints" / "last.ckpt"


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` -> this run directory's checkpoints/last.ckpt; ``auto`` -> the newest
    checkpoint there (last.ckpt, or Lightning's ``hpc_ckpt_N.ckpt`` from a SLURM requeue
    signal) or None when there is none yet; a path must exist. Each is checked to load."""
    if not ckpt_path:
        return None
    if ckpt_path == "auto":
        path = resumable_checkpoint(output_dir, "auto")
        if path is None:
            log.info("ckpt_path=auto: no checkpoint in %s yet, starting from scratch", output_dir)
            return None
    else:
        path = last_checkpoint(output_dir) if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        hint = (
            "set hydra.run.dir to the run directory you want to resume, or pass "
            "ckpt_path=auto to start one when there is nothing to resume"
            if ckpt_path == "last"
            else "pass the path of a .ckpt file written by train.py"
        )
        if path.is_dir() and last_checkpoint(path).is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} is a run folder, not a checkpoint; resume it with "
                f"ckpt_path=last hydra.run.dir={path}"
            )
        if path.is_dir():
            raise not_a_checkpoint_file(path, hint)
        raise ConfigError(f"ckpt_path={ckpt_path!r}: {str(path)!r} does not exist; {hint}")
    try:
        ckpt = check_checkpoint(path, for_resume=True)
    except ConfigError as exc:
        if ckpt_path not in ("last", "auto"):
            raise
        # A damaged last.ckpt (a disk fault: writes are atomic) need not lose the run.
        best = output_dir / "checkpoints" / "best.ckpt"
        fallback = (
            f"; or resume from the best epoch instead: ckpt_path={best}"
            if best.is_file() and best != path
            else ""
        )
        raise ConfigError(f"ckpt_path={ckpt_path}: {exc}{fallback}") from None
    log.info(
        "%sresuming from %s (epoch %s, step %s)",
        f"ckpt_path={ckpt_path}: " if ckpt_path in ("auto", "last") else "",
        path,
        ckpt.get("epoch", "?"),
        ckpt.get("global_step", "?"),
    )
    return str(path)


# Keys of the model group that set how the tower runs, not what it is (not tower arguments).
MODEL_RUN_OPTIONS = ("channels_last", "compile", "backbone_lr_mult")


def split_model_config(model_cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model group as (tower config, run options such as ``compile``), both plain dicts."""
    tower = OmegaConf.to_container(model_cfg, resolve=True)
    options = {k: tower.pop(k) for k in MODEL_RUN_OPTIONS if k in tower}
    return tower, options


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


def size_data_for_weights(model_cfg: DictConfig, datamodule: Any) -> None:
    """Deliver the data at the input size of the weights a backbone tower starts from (or at
    ``model.image_size`` when set), before any image is read; one line when that changes
    ``data.image_size``."""
    tower, _ = split_model_config(model_cfg)
    if not hasattr(tower_class(tower), "input_defaults"):
        return
    size = tower.get("image_size") or input_defaults(tower, 3).get("image_size")
    wanted = image_size_pair(size, "model.image_size")
    if wanted is None or datamodule.image_size == wanted:
        return
    whose = "model.image_size" if tower.get("image_size") else "the pretrained weights' input size"
    log.info(
        "data: images resized to %dx%d, %s (data.image_size=%s; model.image_size=[H,W] sets "
        "another)",
        *wanted,
        whose,
        "x".join(map(str, datamodule.image_size)) if datamodule.image_size else "null",
    )
    datamodule.image_size = wanted


def build_module(cfg: DictConfig, datamodule: Any, resuming: bool = False) -> SiameseModule:
    """The Siamese module, its tower sized for the data (channels, image size, statistics).

    A backbone tower's input statistics are those of its pretrained weights; ``resuming``
    builds it without them (the checkpoint's weights replace them)."""
    tower, options = split_model_config(cfg.model)
    channels, height, width = datamodule.image_shape
    defaults: dict[str, Any] = {"in_channels": channels, "image_size": [height, width]}
    for key, value in input_defaults(tower, channels).items():
        if key != "image_size":
            defaults[key] = value
    if tower.get("input_mean") is None and "input_mean" not in defaults:
        defaults["input_mean"], defaults["input_std"] = datamodule.input_stats()
    for key, value in defaults.items():
        if tower.get(key) is None:
            tower[key] = value
    tower["image_size"] = list(
        image_size_pair(tower["image_size"], "model.image_size")
    )  # 32 means 32x32
    if tower["in_channels"] != channels or list(tower["image_size"]) != [height, width]:
        raise ConfigError(
            f"model expects {tower['in_channels']}x{tower['image_size']} images but the data "
            f"gives {channels}x{[height, width]}; leave model.in_channels/model.image_size null"
        )
    container = OmegaConf.to_container(cfg, resolve=True)
    container["model"] = tower
    if datamodule.image_size is not None and isinstance(container.get("data"), dict):
        container["data"]["image_size"] = list(datamodule.image_size)  # as trained
    if resuming:
        tower = without_pretrained(tower)
    test_classes = datamodule.load_splits().test.classes
    groups = class_groups(test_classes, cfg.get("oneshot_within"), "oneshot_within")
    module = SiameseModule(
        tower=tower,
        distance=OmegaConf.to_container(cfg.distance, resolve=True),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True)
        if cfg.get("scheduler")
        else None,
        eval_pairs=cfg.eval_pairs,
        eval_seed=cfg.eval_seed,
        config=container,
        channels_last=bool(options.get("channels_last", False)),
        compile=options.get("compile", False),
        backbone_lr_mult=options.get("backbone_lr_mult", 1.0),
    )
    module.oneshot_groups = groups
    if not options.get("compile"):
        # The model summary shows each layer's sizes and the FLOPs (not "Total FLOPs: 0").
        module.example_input_array = torch.zeros(2, channels, height, width)
    if HydraConfig.initialized():  # train.py, not a config composed in code
        module.run_overrides = list(HydraConfig.get().overrides.task)
    return module


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Every ``_target_`` entry of a callbacks/logger group."""
    if not group:
        return []
    return [build(c) for c in group.values() if c is not None and "_target_" in c]


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write metrics.json; return every logged metric."""
    check_config(cfg)
    trainer_cfg = check_trainer(cfg.trainer)  # before any data is read
    processes = planned_processes(trainer_cfg)
    if processes > 1 and trainer_cfg.get("use_distributed_sampler", True):
        raise ConfigError(
            "trainer.use_distributed_sampler=true cannot shard the class-balanced batch "
            "samplers, which split the global batch between processes themselves; set "
            "trainer.use_distributed_sampler=false"
        )
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    # The trainer first: a value Lightning refuses is reported before any data is read.
    loggers, logger_callbacks = build_loggers(cfg, ckpt_path)
    # Progress bar / model summary callbacks go when the trainer flags turn them off.
    callbacks = select_callbacks(
        [*instantiate_all(cfg.get("callbacks")), *logger_callbacks], cfg.trainer
    )
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if checkpoint is None:
        raise ConfigError(
            "callbacks has no ModelCheckpoint; keep callbacks.model_checkpoint so the run "
            "writes checkpoints/best.ckpt (the checkpoint tested after fit)"
        )
    # Paths in a checkpoint are relative to the run folder: a copied or moved run resumes,
    # tests and reports its own files.
    callbacks.append(RunRelativePaths(output_dir))
    plugins: list[Any] = [AtomicCheckpointIO(output_dir)]  # a kill mid-save keeps the old file
    if trainer_cfg.get("sync_batchnorm"):  # torch's SyncBatchNorm refuses CPU tensors
        plugins.append(SyncBatchNormPlugin(cpu=not uses_gpu(trainer_cfg)))
    trainer = build_trainer(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins
    )
    datamodule = build(cfg.data)
    size_data_for_weights(cfg.model, datamodule)  # before any image is read
    datamodule.check_batches(processes)  # plans (and logs) the global batch of all processes
    check_augment_size(cfg.data.get("augment"), datamodule.image_shape[1:])
    module = build_module(cfg, datamodule, resuming=ckpt_path is not None)
    # SIGTERM outside fit (between the stages, while testing, before metrics.json) stops
    # the run at once with the same line: Python's default would end it without a word,
    # and Lightning would go on testing.
    with sigterm_stops_outside_fit(trainer):
        with exit_on_stop_signal(trainer, output_dir, "training"):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        best = checkpoint.best_model_path or checkpoint.last_model_path or None
        after = "testing" if cfg.get("test", True) else "writing metrics.json"
        finished, hint = f"{after} (training had finished)", _test_again_hint(output_dir, best)
        with exit_on_stop_signal(trainer, output_dir, finished, hint):
            metrics = scalar_metrics(trainer.callback_metrics)
            # The monitored metric is reported at its best epoch, the checkpoint that gets
            # tested (what a sweeper should compare), not at the last epoch.
            if checkpoint.monitor and checkpoint.best_model_score is not None:
                metrics[checkpoint.monitor] = float(checkpoint.best_model_score)

            report: dict[str, Any] = {}
            if cfg.get("test", True):
                if not best:
                    log.warning("no checkpoint was written; testing the weights in memory")
                # Its own check at the end too: a SIGTERM Lightning only noted stops the run
                # before the table and metrics.json, not after them.
                with exit_on_stop_signal(trainer, output_dir, finished, hint):
                    trainer.test(
                        module, datamodule=datamodule, ckpt_path=best or None, verbose=False
                    )
                tested = {
                    k: v
                    for k, v in scalar_metrics(trainer.callback_metrics).items()
                    if k.startswith("test/")
                }
                # The evaluator's report as computed (float64), not the logger's float32 copy.
                if module.last_eval is not None and module.last_eval.stage == "test":
                    logged = module.last_eval.report.logged()
                    tested.update({f"test/{k}": v for k, v in logged.items()})
                metrics.update(tested)
                report = {
                    "protocol": "leave-one-out over the test split",
                    "oneshot_within": cfg.get("oneshot_within"),
                    "checkpoint": best,
                    **tested,
                }
                if trainer.is_global_zero:
                    print_table(tested, prefix="test/", order=REPORTED)
            optimized = cfg.get("optimized_metric")
            if optimized in metrics:  # the sweep objective, e.g. the best val/precision_at_1
                report.update({"optimized_metric": optimized, optimized: metrics[optimized]})
            if report and trainer.is_global_zero:
                write_metrics(output_dir / "metrics.json", report)
    return metrics


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.as_tensor(v).numel() == 1}
