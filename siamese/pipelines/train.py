"""Training job: config -> data module, Siamese module, Trainer -> fit, test, metrics.json."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from siamese.callbacks import is_positive_int, select_callbacks
from siamese.checkpointing import AtomicCheckpointIO
from siamese.cli import resumable_checkpoint
from siamese.config import build
from siamese.distributed import SyncBatchNormPlugin
from siamese.errors import ConfigError, find_in_chain
from siamese.evaluation.oneshot import class_groups
from siamese.inference import check_checkpoint, not_a_checkpoint_file
from siamese.loggers import build_loggers
from siamese.losses import PairLoss
from siamese.metric_names import EVAL_METRICS, TEST_ONLY_METRICS
from siamese.module import SiameseModule, scheduler_kwargs
from siamese.pipelines.report import print_table, write_metrics
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


def check_optimization(optimizer_cfg: DictConfig, scheduler_cfg: DictConfig | None) -> None:
    """Build the optimizer (and scheduler) on one dummy parameter, so that a value torch
    refuses (``optimizer.lr=-1``, a one-cycle ``pct_start`` of 2) stops the run at start
    in one line naming the settings, not with a traceback from inside ``fit``."""
    for name, part in (("optimizer", optimizer_cfg), ("scheduler", scheduler_cfg)):
        if not part:
            continue
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
        ckpt = check_checkpoint(path)
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
MODEL_RUN_OPTIONS = ("channels_last", "compile")


def split_model_config(model_cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model group as (tower config, run options such as ``compile``), both plain dicts."""
    tower = OmegaConf.to_container(model_cfg, resolve=True)
    options = {k: tower.pop(k) for k in MODEL_RUN_OPTIONS if k in tower}
    return tower, options


def build_module(cfg: DictConfig, datamodule: Any) -> SiameseModule:
    """The Siamese module, its tower sized for the data (channels, image size, statistics)."""
    tower, options = split_model_config(cfg.model)
    channels, height, width = datamodule.image_shape
    defaults: dict[str, Any] = {"in_channels": channels, "image_size": [height, width]}
    if tower.get("input_mean") is None or tower.get("input_std") is None:
        defaults["input_mean"], defaults["input_std"] = datamodule.input_stats()
    for key, value in defaults.items():
        if tower.get(key) is None:
            tower[key] = value
    if tower["in_channels"] != channels or list(tower["image_size"]) != [height, width]:
        raise ConfigError(
            f"model expects {tower['in_channels']}x{tower['image_size']} images but the data "
            f"gives {channels}x{[height, width]}; leave model.in_channels/model.image_size null"
        )
    container = OmegaConf.to_container(cfg, resolve=True)
    container["model"] = tower
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
    )
    module.oneshot_groups = groups
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
    plugins: list[Any] = [AtomicCheckpointIO()]  # a kill mid-save keeps the old file
    if trainer_cfg.get("sync_batchnorm"):  # torch's SyncBatchNorm refuses CPU tensors
        plugins.append(SyncBatchNormPlugin(cpu=not uses_gpu(trainer_cfg)))
    trainer = build_trainer(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins
    )
    datamodule = build(cfg.data)
    datamodule.check_batches(processes)  # DDP: each process needs whole classes
    module = build_module(cfg, datamodule)
    with exit_on_stop_signal(trainer, output_dir, "training"):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = scalar_metrics(trainer.callback_metrics)
    # The monitored metric is reported at its best epoch, the checkpoint that gets tested
    # (what a sweeper should compare), not at the last epoch.
    if checkpoint.monitor and checkpoint.best_model_score is not None:
        metrics[checkpoint.monitor] = float(checkpoint.best_model_score)

    report: dict[str, Any] = {}
    if cfg.get("test", True):
        best = checkpoint.best_model_path or checkpoint.last_model_path or None
        if not best:
            log.warning("no checkpoint was written; testing the weights in memory")
        with exit_on_stop_signal(trainer, output_dir, "testing (training had finished)"):
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        tested = {
            k: v
            for k, v in scalar_metrics(trainer.callback_metrics).items()
            if k.startswith("test/")
        }
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


@contextlib.contextmanager
def exit_on_stop_signal(trainer: pl.Trainer, output_dir: Path, doing: str) -> Iterator[None]:
    """Say where a stage stopped for a signal and what ``last.ckpt`` holds, and exit
    128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C).

    Lightning ends a stage it got SIGTERM in with ``SIGTERMException``, a SystemExit that
    would exit 0, as if the run had finished; ``LastCheckpoint`` stops the same way for
    SIGTERM under DDP and for a Ctrl-C, after writing ``last.ckpt`` at the end of that
    batch. A second Ctrl-C is Lightning's own stop (``sys.exit(1)`` after its "graceful
    shutdown"), reported here too."""
    try:
        yield
    except SIGTERMException as stop:
        signum = getattr(stop, "signum", signal.SIGTERM)  # Lightning's own: SIGTERM
        _say_stopped(trainer, output_dir, doing, signum)
        raise SystemExit(128 + signum) from None
    except SystemExit as stop:
        if stop.code != 1 or not trainer.interrupted:
            raise
        _say_stopped(trainer, output_dir, doing, signal.SIGINT)  # Lightning's KeyboardInterrupt
        raise SystemExit(128 + signal.SIGINT) from None


def _say_stopped(trainer: pl.Trainer, output_dir: Path, doing: str, signum: int) -> None:
    if trainer.is_global_zero:
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"stopped: {name} while {doing}, at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}; {_resume_hint(output_dir)}",
            file=sys.stderr,
            flush=True,
        )


def _resume_hint(output_dir: Path) -> str:
    last = last_checkpoint(output_dir)
    try:  # mmap: only the two numbers are read
        saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        where = f"epoch {saved['epoch']}, step {saved['global_step']}"
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError):
        return f"no readable {last} was written: run it again to start over"
    return (
        f"checkpoints/last.ckpt holds {where}: resume with ckpt_path=last "
        f"hydra.run.dir={output_dir}"
    )


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.as_tensor(v).numel() == 1}
