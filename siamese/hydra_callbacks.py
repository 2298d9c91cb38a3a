"""Hydra callbacks: guard a run directory; check a sweep's metric and write its summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from siamese.cli import fail
from siamese.errors import ConfigError
from siamese.sweeps import check_optimized_metric, summarize


class RunDirGuard(Callback):
    """Stops before Hydra writes anything when ``hydra.run.dir`` holds an earlier run's
    checkpoints, metrics or export and the command does not resume that run
    (``ckpt_path=last``, ``auto`` or a checkpoint inside it: export.py may write beside a
    run's own checkpoint, replacing its earlier export of it)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("last", "auto") or (
            ckpt_path and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())
        ):
            return
        # A training or evaluation run, or an export (model.json beside its model file).
        names = ("checkpoints", "metrics.json", "model.json")
        taken = [name for name in names if (run_dir / name).exists()]
        if taken:
            resume = (
                ", or pass ckpt_path=last to resume that run"
                if config.get("task_name") in ("train", "debug")
                else ""  # evaluate.py and export.py have nothing to resume
            )
            fail(
                f"hydra.run.dir={str(run_dir)!r} already holds a run ({', '.join(taken)}); "
                f"choose another hydra.run.dir{resume} (nothing in it was changed)"
            )


# DDP in a local sweep: Lightning starts each job's other processes by re-running the
# whole command, so they replay the sweep in step with the first process. They read the
# first process's sweep directory from here (conf/hydra/default.yaml).
SWEEP_DIR_ENV = "SIAMESE_SWEEP_DIR"


def is_first_process() -> bool:
    """False in the processes that Lightning, torchrun or SLURM start besides rank 0."""
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") in ("", "0") for name in names)


class SweepSummary(Callback):
    """For ``-m`` sweeps: check ``optimized_metric`` before any job starts, and keep
    ``<sweep dir>/sweep_summary.csv`` up to date after each job (so a sweep that stops early
    still leaves one) and print it as a table at the end. Only the first process does: the
    other DDP processes of a job replay the sweep silently."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_optimized_metric(config.get("optimized_metric"))
        except ConfigError as exc:
            fail(str(exc))
        if is_first_process():
            os.environ[SWEEP_DIR_ENV] = str(Path(config.hydra.sweep.dir).resolve())

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not is_first_process():
            return
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            summarize(Path(config.hydra.sweep.dir), config.get("optimized_metric"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_first_process():
            return
        os.environ.pop(SWEEP_DIR_ENV, None)
        table = summarize(Path(config.hydra.sweep.dir), config.get("optimized_metric"))
        if table:
            print(table, flush=True)
