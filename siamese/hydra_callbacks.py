"""Hydra callbacks: guard a run directory; check a sweep's metric and write its summary."""

from __future__ import annotations

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
    checkpoints or metrics and the command does not resume that run (``ckpt_path=last`` or a
    checkpoint inside it)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last" or (
            ckpt_path and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())
        ):
            return
        taken = [name for name in ("checkpoints", "metrics.json") if (run_dir / name).exists()]
        if taken:
            fail(
                f"hydra.run.dir={str(run_dir)!r} already holds a run ({', '.join(taken)}); "
                "choose another hydra.run.dir, or pass ckpt_path=last to resume that run "
                "(nothing in it was changed)"
            )


class SweepSummary(Callback):
    """For ``-m`` sweeps: check ``optimized_metric`` before any job starts, and keep
    ``<sweep dir>/sweep_summary.csv`` up to date after each job (so a sweep that stops early
    still leaves one) and print it as a table at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_optimized_metric(config.get("optimized_metric"))
        except ConfigError as exc:
            fail(str(exc))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            summarize(Path(config.hydra.sweep.dir), config.get("optimized_metric"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        table = summarize(Path(config.hydra.sweep.dir), config.get("optimized_metric"))
        if table:
            print(table, flush=True)
