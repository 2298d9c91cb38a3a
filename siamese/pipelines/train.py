"""Training job: config -> data module, Siamese module, Trainer -> fit, test, metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from siamese.callbacks import select_callbacks
from siamese.callbacks.signals import after_training_hint as _test_again_hint
from siamese.callbacks.signals import exit_on_stop_signal, sigterm_stops_outside_fit
from siamese.checkpointing import AtomicCheckpointIO, RunRelativePaths
from siamese.config import build
from siamese.console import in_sweep, next_steps, say, shown_path
from siamese.data.datamodule import image_size_pair
from siamese.distributed import SyncBatchNormPlugin
from siamese.errors import ConfigError, find_in_chain
from siamese.evaluation.oneshot import class_groups
from siamese.inference import check_checkpoint, not_a_checkpoint_file
from siamese.loggers import build_loggers
from siamese.metric_names import EVAL_METRICS, TEST_ONLY_METRICS
from siamese.models.backbones import input_defaults, without_pretrained
from siamese.module import SiameseModule
from siamese.pipelines.report import print_table, write_metrics
from siamese.pipelines.train_checks import (
    check_augment_size,
    check_config,
    check_trainer,
    planned_processes,
    uses_gpu,
)
from siamese.registry import tower_class
from siamese.resume import resumable_checkpoint

log = logging.getLogger(__name__)

# Reported after training (as test/<name>), in this order: what the module logs, less the
# loss and the mean pair distances.
REPORTED = (
    *(n for n in EVAL_METRICS if n not in ("loss", "pos_distance", "neg_distance")),
    *TEST_ONLY_METRICS,
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
    # The monitored one (best.ckpt), not the unmonitored ones that write last.ckpt.
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
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
    if trainer.is_global_zero and not in_sweep():
        ckpt = shown_path(best or last_checkpoint(output_dir))
        say(next_steps(output_dir, ["python", "evaluate.py", f"ckpt_path={ckpt}"]))
    return metrics


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.as_tensor(v).numel() == 1}
