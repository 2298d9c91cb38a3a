"""Experiment loggers (the ``logger=`` group): CSV, TensorBoard, W&B online or offline.

``build_loggers(cfg, ckpt_path)`` turns the group into Lightning loggers plus one callback
that logs the resolved config and git commit as the run's hyperparameters, keeps the W&B
run id in every checkpoint (so ``ckpt_path=`` resumes the same W&B run) and closes that
run when training ends. A resumed run appends to the CSV and TensorBoard logs.
"""

from __future__ import annotations

import csv
import importlib
import logging
import netrc
import os
import re
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger as _CSVLogger
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.loggers import WandbLogger as _WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from siamese.config import build
from siamese.errors import ConfigError

log = logging.getLogger(__name__)

CODE_DIR = Path(__file__).resolve().parent.parent
# Checkpoint key holding the W&B run id, read back when a run resumes.
WANDB_RUN_ID = "wandb_run_id"
DEFAULT_WANDB_HOST = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 3.0


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the rows of an earlier (resumed) run in the same folder.

    Lightning deletes an existing metrics.csv when its writer starts; a resumed run must
    keep its rows. Rows logged at or after ``resume_step``, the checkpoint's global step,
    came after that checkpoint (a run killed between checkpoints, or the earlier run's
    test) and are dropped: the resumed run logs those steps again.
    """

    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:  # called by the parent's __init__
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            self.metrics_keys = list(reader.fieldnames or [])
        if self._resume_step is None:
            return
        kept = [r for r in rows if not r.get("step") or int(r["step"]) < self._resume_step]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)


class CSVLogger(_CSVLogger):
    """Lightning's CSVLogger that appends to an existing ``metrics.csv`` instead of wiping it.

    Args:
        resume_step: the global step of the checkpoint a resumed run starts from; rows
            logged at or after it are dropped. Set by ``build_loggers``, not by the config.
    """

    def __init__(
        self,
        save_dir: str | Path,
        name: str | None = "csv",
        version: int | str | None = "",
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
        resume_step: int | None = None,
    ) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._resume_step)
        return self._experiment


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger with wandb.init's grouping keywords named.

    Args:
        save_dir: the folder that gets ``wandb/<offline-run-...|run-...>/``.
        project, entity, group, tags, name: where the run is filed and what it is called
            (``entity`` None: your default entity).
        offline: log to local files only; ``build_loggers`` decides it (see
            ``build_wandb_logger``).
        log_model: upload checkpoints as artifacts (True: at the end, "all": as written).
        id: the W&B run to continue (a resumed run); set by ``build_loggers``.
        **kwargs: any other keyword of ``wandb.init`` (``+logger.notes=...``).
    """

    def __init__(
        self,
        save_dir: str | Path = ".",
        project: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        offline: bool = False,
        log_model: bool | str = False,
        id: str | None = None,
        **kwargs: Any,
    ) -> None:
        init = {"entity": entity, "group": group, "tags": list(tags or []) or None}
        super().__init__(
            name=name,
            save_dir=save_dir,
            offline=offline,
            id=id,
            project=project,
            log_model=log_model,
            **{k: v for k, v in init.items() if v is not None},
            **kwargs,
        )
        # Lightning always passes anonymous=None, which wandb 0.31 warns about on every run.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


class LoggerSetup(NamedTuple):
    """What the Trainer needs: its loggers, and the callback that serves them."""

    loggers: list[Logger]
    callbacks: list[Callback]


class RunRecord(Callback):
    """Logs the run's config as hyperparameters, keeps the W&B run id in checkpoints.

    Args:
        hparams: the resolved config with the git commit, logged once training starts.
        metric_names: metrics the TensorBoard HPARAMS tab shows beside the config.
        close_wandb_after: the stage (``fit`` or ``test``) after which the W&B run this job
            opened is finished, so the next run in the same process (a sweep) gets its own;
            None leaves it open (a run someone else started).
    """

    def __init__(
        self,
        hparams: dict[str, Any],
        metric_names: list[str] | None = None,
        close_wandb_after: str | None = None,
    ) -> None:
        self.hparams = hparams
        self.metric_names = metric_names or []
        self.close_wandb_after = close_wandb_after

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.hparams)
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                _tensorboard_hparams(logger, self.hparams, self.metric_names)
            logger.save()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, _WandbLogger) and logger.version:
                checkpoint[WANDB_RUN_ID] = logger.version

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != self.close_wandb_after or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, _WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()


def _tensorboard_hparams(
    logger: TensorBoardLogger, hparams: dict[str, Any], metric_names: list[str]
) -> None:
    """The HPARAMS tab: the flattened config beside metrics the run logs as scalars anyway.

    Lightning writes this summary only with a metric value (``hp_metric``, a placeholder
    scalar); listing the names alone lets TensorBoard read the real values from the run.
    """
    if getattr(logger, "_default_hp_metric", False):
        return  # Lightning wrote it already, with hp_metric
    from lightning_fabric.utilities.logger import _flatten_dict
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    flat = logger._sanitize_params(_flatten_dict(hparams))
    flat = {k: v for k, v in flat.items() if isinstance(v, (bool, int, float, str))}
    writer = logger.experiment._get_file_writer()
    for summary in hparams_summary(flat, dict.fromkeys(metric_names, 0.0)):
        writer.add_summary(summary)


def build_loggers(cfg: DictConfig, ckpt_path: str | None = None) -> LoggerSetup:
    """The ``logger`` group's loggers; a resumed run (``ckpt_path``) continues their logs.

    The group is one logger config (a ``_target_`` at its top: ``logger=wandb``) or several
    under their own keys (``logger=many``: ``logger.csv``, ``logger.wandb``, ...).
    """
    group = cfg.get("logger")
    if not group:
        return LoggerSetup([], [])
    configs = [group] if "_target_" in group else [c for c in group.values() if c]
    resume = _resume_state(ckpt_path)
    loggers: list[Logger] = []
    close_wandb_after = None
    for conf in configs:
        cls = get_class(conf._target_)
        if issubclass(cls, _WandbLogger):
            wandb = _require("wandb", "the W&B logger")
            if wandb.run is None:  # else the caller's own run (a W&B sweep agent), kept open
                close_wandb_after = "test" if cfg.get("test", True) else "fit"
            logger = build_wandb_logger(conf, resume.get(WANDB_RUN_ID))
        elif issubclass(cls, TensorBoardLogger):
            _require("tensorboard", "the TensorBoard logger")
            # Hides events logged after the checkpoint, as the CSV logger drops its rows.
            step = resume.get("global_step")
            logger = build(conf, **({} if step is None else {"purge_step": step}))
        elif issubclass(cls, CSVLogger):
            logger = build(conf, resume_step=resume.get("global_step"))
        else:
            logger = build(conf)
        if logger is not None:
            loggers.append(logger)
    if not loggers:
        return LoggerSetup([], [])
    hparams = {**OmegaConf.to_container(cfg, resolve=True), "git": git_info()}
    return LoggerSetup(loggers, [RunRecord(hparams, _hparams_metrics(cfg), close_wandb_after)])


def _hparams_metrics(cfg: DictConfig) -> list[str]:
    """The optimised metric and its test counterpart (val/x -> test/x)."""
    name = cfg.get("optimized_metric")
    if not name:
        return []
    names = [name]
    if name.startswith("val/"):
        names.append("test/" + name.removeprefix("val/"))
    return names


def _resume_state(ckpt_path: str | None) -> dict[str, Any]:
    """The global step and W&B run id of the checkpoint a resumed run starts from."""
    if not ckpt_path:
        return {}
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    run_id = ckpt.get(WANDB_RUN_ID)
    # The id names wandb's run folder: from a file, it must be an id, not a path.
    if run_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", str(run_id)):
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r} holds a W&B run id {str(run_id)[:80]!r} that is not "
            "a plain id (letters, digits, - and _); pass a checkpoint written by train.py"
        )
    return {"global_step": ckpt.get("global_step"), WANDB_RUN_ID: run_id}


def _require(module: str, what: str) -> Any:
    """Import an optional package, or fail in one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{what} needs the {module} package: pip install {module}") from exc


def build_wandb_logger(conf: DictConfig, run_id: str | None = None) -> _WandbLogger | None:
    """A WandbLogger, online only when it can be: never prompts for a login, never hangs.

    ``WANDB_MODE=offline`` (or ``dryrun``) forces offline and ``WANDB_MODE=disabled`` drops
    the logger. ``offline: false`` goes online when an API key is found and the W&B host
    answers within a few seconds; otherwise the run is logged offline, with one warning
    that says why and how to upload it later. ``run_id`` continues that W&B run.
    """
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode == "disabled":
        log.info("WANDB_MODE=disabled: not logging to W&B")
        return None
    offline = bool(conf.get("offline", False)) or mode in ("offline", "dryrun")
    kwargs: dict[str, Any] = {}
    if offline and conf.get("log_model"):
        raise ConfigError(
            f"W&B log_model={conf.log_model} uploads checkpoints and needs an online run; "
            "set log_model=false, or offline=false with WANDB_MODE unset"
        )
    if not offline:
        reason = wandb_offline_reason()
        if reason is not None:
            offline = True
            if conf.get("log_model"):
                kwargs["log_model"] = False
                reason += "; log_model is off"
            if rank_zero_only.rank == 0:
                pattern = Path(conf.get("save_dir") or ".") / "wandb" / "offline-run-*"
                log.warning(
                    f"W&B: {reason}; logging offline instead. Upload the run later with: "
                    f"wandb sync {pattern}"
                )
    if run_id:  # Lightning already asks wandb.init for resume="allow"
        kwargs["id"] = run_id
    return build(conf, offline=offline, **kwargs)


def wandb_offline_reason(base_url: str | None = None) -> str | None:
    """Why a W&B run cannot go online here (no API key, host unreachable), or None."""
    base_url = base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST
    if not _has_wandb_api_key(base_url):
        return "no API key (set WANDB_API_KEY or run `wandb login`)"
    if not _reachable(base_url):
        return f"{base_url} did not answer within {PROBE_TIMEOUT_S:g} s"
    return None


def _has_wandb_api_key(base_url: str) -> bool:
    """An API key in the environment or in the netrc file ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        creds = netrc.netrc(path).authenticators(urlsplit(base_url).netloc)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(creds and creds[2])


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` seconds.

    The probe runs in a daemon thread: a name lookup can outlast the socket timeout.
    """
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answered = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                answered.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return answered.is_set()


def git_info(path: Path = CODE_DIR) -> dict[str, Any]:
    """The git commit of the code and whether the work tree differs; None outside git."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=path, capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}
