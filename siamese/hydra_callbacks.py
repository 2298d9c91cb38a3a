"""Hydra callbacks: guard a run directory; check a sweep's metric and write its summary."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from siamese import run_dirs, sweeps
from siamese.errors import ConfigError, SiameseError
from siamese.resume import RESUME_MODES
from siamese.sweeps import (
    check_optimized_metric,
    clear_job_status,
    failure_reason,
    summarize,
    write_job_status,
)
from siamese.task import TaskExit


def refusing(method: Callable[..., None]) -> Callable[..., None]:
    """Hydra turns an Exception raised in a callback into a warning and carries on: a
    refusal (a SiameseError) leaves as ``TaskExit``, which the task wrapper makes one line."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except SiameseError as exc:
            raise TaskExit(f"error: {exc}") from None

    return wrapper


class RunDirGuard(Callback):
    """Claims the run directory for this job before Hydra writes anything into it
    (``siamese.run_dirs.claim``): refuses an empty ``hydra.run.dir``, a file, a folder
    another running job holds, and one that holds another job's run (train.py may resume its
    own run with ``ckpt_path=last``, ``auto`` or a checkpoint inside it; export.py may
    replace its own earlier export of a checkpoint in its folder); then locks the folder for
    the whole process and records the job in ``run.json``.

    Sweeps: each job's directory is new, so its job only locks and records it
    (``on_job_start``, released at its end). Only the first process of a job does any of
    this: DDP's other processes write into the folder their first process holds. They
    only refuse what it refuses (``siamese.run_dirs.check``), and do not save Hydra's
    ``.hydra/`` there: torchrun's and srun's processes, other nodes' too (on a shared
    filesystem), run the same command into the same folder as rank 0."""

    def __init__(self) -> None:
        self._job_dir: Path | None = None  # the sweep job this process has locked

    @refusing
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Every process checks, so that all stop at once: one left running would wait for
        # rank 0 until the process group's timeout (30 minutes).
        check_launcher_run_dir(config)
        task = config.get("task_name") or "train"
        run_dir, ckpt_path = config.hydra.run.get("dir"), config.get("ckpt_path")
        if is_first_process():
            run_dirs.claim(run_dir, task, ckpt_path)
            return
        run_dirs.check(run_dir, task, ckpt_path)  # rank 0 holds the lock
        # As Lightning starts its own DDP processes (hydra.output_subdir=null).
        with read_write(config.hydra):
            config.hydra.output_subdir = None

    @refusing
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Before Hydra writes any job's .hydra/: a sweep run again into the same
        # hydra.sweep.dir would start over its jobs' runs (a requeued job resumes with auto).
        if not is_first_process() or config.get("ckpt_path") in RESUME_MODES:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = sorted(p.name for p in sweep_dir.glob("*") if p.is_dir() and run_dirs.results_in(p))
        if jobs:
            raise ConfigError(
                f"hydra.sweep.dir={str(sweep_dir)!r} already holds the runs of an earlier sweep "
                f"({', '.join(jobs[:5])}{', ...' if len(jobs) > 5 else ''}); choose another "
                "hydra.sweep.dir (nothing in it was changed)"
            )

    @refusing
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_first_process() or not _multirun():
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        task = config.get("task_name") or "train"
        # The same rule as a single run: a sweep run again into its hydra.sweep.dir
        # would train over its jobs' runs (a requeued job resumes with auto).
        run_dirs.claim(job_dir, task, config.get("ckpt_path"))
        self._job_dir = job_dir

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self._job_dir is not None:  # the basic launcher runs the next job in this process
            run_dirs.unlock(self._job_dir)
            self._job_dir = None


# DDP in a local sweep: Lightning starts each job's other processes by re-running the
# whole command, so they replay the sweep in step with the first process. They read the
# first process's sweep directory from here (conf/hydra/default.yaml).
SWEEP_DIR_ENV = "SIAMESE_SWEEP_DIR"


def is_first_process() -> bool:
    """False in the processes that Lightning, torchrun or SLURM start besides rank 0."""
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") in ("", "0") for name in names)


def launcher_processes() -> int:
    """How many processes torchrun started for this run (``WORLD_SIZE``); 1 otherwise."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return 1
    size = os.environ.get("WORLD_SIZE", "1")
    return int(size) if size.isdigit() else 1


def check_launcher_run_dir(config: DictConfig) -> None:
    """Under torchrun with several processes, refuse a ``hydra.run.dir`` made from the start
    time (the default): each process, on each node, would get its own folder, while rank 0
    alone writes the checkpoints that every process reads back for the test. (Called for
    single runs only: a sweep's jobs get their folders from hydra.sweep.dir.)"""
    processes = launcher_processes()
    if processes < 2:
        return
    raw = OmegaConf.to_container(config.hydra.run, resolve=False).get("dir")
    if "${now:" not in str(raw):
        return
    raise ConfigError(
        f"torchrun started {processes} processes, and hydra.run.dir={raw} would give each "
        "its own folder; give every node the same hydra.run.dir, on a filesystem they all "
        "see (e.g. hydra.run.dir=outputs/train/runs/two-nodes)"
    )


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class SweepSummary(Callback):
    """For ``-m`` sweeps: check ``optimized_metric`` before any job starts, and keep
    ``<sweep dir>/sweep_summary.csv`` up to date after each job (so a sweep that stops early
    still leaves one) and print it as a table at the end. Only the first process does: the
    other DDP processes of a job replay the sweep silently.

    Each job's ending is Hydra's ``JobReturn``: one that raised is marked ``failed`` in its
    directory (``job_status.json``, with the error's line). One whose process stops inside it
    (Ctrl-C, a signal) is marked ``stopped`` by the task wrapper (``siamese.task``), which
    also prints the table when the sweep ends early (``siamese.sweeps.unfinished_summary``).
    """

    @refusing
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_optimized_metric(config.get("optimized_metric"))  # a ConfigError: one line
        if is_first_process():
            os.environ[SWEEP_DIR_ENV] = str(Path(config.hydra.sweep.dir).resolve())
            sweeps.start_sweep(Path(config.hydra.sweep.dir), config.get("optimized_metric"))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_first_process() and _multirun():
            # A requeued job starts again in its directory.
            clear_job_status(Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not is_first_process() or not _multirun():
            return
        if job_return.status == JobStatus.FAILED:
            job_dir = Path(config.hydra.runtime.output_dir)
            write_job_status(job_dir, "failed", failure_reason(job_return._return_value))
        summarize(Path(config.hydra.sweep.dir), config.get("optimized_metric"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_first_process():
            return
        os.environ.pop(SWEEP_DIR_ENV, None)
        sweeps.end_sweep()
        table = summarize(Path(config.hydra.sweep.dir), config.get("optimized_metric"))
        if table:
            print(table, flush=True)
