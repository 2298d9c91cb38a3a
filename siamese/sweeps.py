"""Sweeps: the metric a sweeper optimises, and ``sweep_summary.csv`` (one row per run).

The summary is read back from the job directories (``.hydra/overrides.yaml``,
``metrics.json`` and, for a job that did not finish, ``job_status.json``), so it works the
same for the basic launcher, submitit (jobs in other processes or on other nodes) and any
sweeper (grid, Optuna).
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from siamese.errors import ConfigError, SiameseError, find_in_chain
from siamese.metric_names import EVAL_METRICS, TEST_ONLY_METRICS, available_metrics

log = logging.getLogger(__name__)

SUMMARY_NAME = "sweep_summary.csv"
# In a job directory: how a job that did not finish ended, {"status": ..., "error": ...}.
STATUS_NAME = "job_status.json"


def check_optimized_metric(name: Any) -> None:
    """Refuse an ``optimized_metric`` that no run logs, naming the ones that exist."""
    if name is None:
        return
    names = available_metrics()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"optimized_metric={name!r} is not a metric this run logs; {hint}choose one of: "
            + ", ".join(names)
        )


def optimized_value(
    name: str | None, metrics: dict[str, float], sweeping: bool = True
) -> float | None:
    """The value a sweeper gets for ``name``. Missing after training: a ConfigError in a
    sweep (the sweeper cannot rank the run); a warning and None in a single run, which
    finished and has nothing to return it to (``trainer.limit_val_batches=0``, say)."""
    if name is None:
        return None
    if name not in metrics:
        logged = ", ".join(sorted(k for k in metrics if "/" in k)) or "nothing"
        message = (
            f"optimized_metric={name!r} was not logged by this run (no validation ran, or a "
            f"recall@k or one-shot key needs a larger split); logged: {logged}"
        )
        if sweeping:
            raise ConfigError(message)
        log.warning("%s; a sweep (-m) would stop here", message)
        return None
    return float(metrics[name])


# -- the summary ------------------------------------------------------------------------------
def failure_reason(exc: BaseException) -> str:
    """Why a job failed, in one line: a user error's own message (its value and fix), else
    the exception's type and the first line of its message."""
    cause = find_in_chain(exc, lambda e: isinstance(e, SiameseError))
    if cause is not None:
        exc = cause
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if isinstance(exc, SiameseError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def write_job_status(job_dir: Path, status: str, error: str) -> None:
    """Record in ``job_dir`` that its job did not finish (``failed``: it raised;
    ``stopped``: its process exited during it) and why, for ``summary_rows``."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / STATUS_NAME).write_text(json.dumps({"status": status, "error": error}) + "\n")


def clear_job_status(job_dir: Path) -> None:
    """Forget an earlier attempt's ending (a requeued job starts again in its directory)."""
    (job_dir / STATUS_NAME).unlink(missing_ok=True)


def read_job_status(job_dir: Path) -> tuple[str, str] | None:
    """``(status, error)`` written by ``write_job_status``, or None for a job without one."""
    path = job_dir / STATUS_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        return "failed", f"unreadable {STATUS_NAME}"
    return str(record.get("status") or "failed"), str(record.get("error") or "")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep (those with ``.hydra/overrides.yaml``), by job number."""
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(
        jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


def summary_rows(sweep_dir: Path, metric_order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per job: ``job``, ``status``, each override, the job's metrics, and for a job
    that did not finish its one-line ``error``.

    ``status`` is ``done`` (metrics.json written), ``failed`` (the job raised),
    ``stopped`` (its process exited during it: a one-line user error, Ctrl-C or a
    pre-emption), or ``no metrics.json`` (still running, or killed outright). The metrics
    a failed or stopped job wrote before it ended are kept.
    """
    rows = []
    for job in job_dirs(sweep_dir):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        row: dict[str, Any] = {"job": job.name}
        report_path = job / "metrics.json"
        report: dict[str, Any] = {}
        if report_path.is_file():
            try:
                report = json.loads(report_path.read_text())
            except json.JSONDecodeError:
                report = {}
        row["status"] = "done" if report else "no metrics.json"
        ended = read_job_status(job)
        if ended is not None:
            row["status"] = ended[0]
        for item in overrides:
            key, _, value = str(item).partition("=")
            row[key.lstrip("+~")] = value
        numbers = {k: v for k, v in report.items() if isinstance(v, (int, float))}
        optimized = report.get("optimized_metric")
        if isinstance(optimized, str) and optimized in numbers:
            row[optimized] = numbers.pop(optimized)
        first = [k for k in metric_order if k in numbers]
        for key in [*first, *sorted(set(numbers) - set(first))]:
            row[key] = numbers[key]
        if ended is not None:
            row["error"] = ended[1]
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as ``sweep_summary.csv`` in ``sweep_dir`` (via a temporary file)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path = sweep_dir / SUMMARY_NAME
    # Jobs of a parallel launcher (submitit) may rewrite it at once: a temp file each.
    tmp = path.with_suffix(f".csv.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table; numbers with 4 decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if math.isfinite(value) else str(value)
        if isinstance(value, str) and "." in value:  # a swept float such as optimizer.lr
            try:
                return f"{float(value):.4g}"
            except ValueError:
                pass
        return "" if value is None else str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


# Columns of the printed table besides the job, its status and the overrides that vary.
PRINTED_METRICS = ("test/precision_at_1", "test/map_at_r", "test/roc_auc", "test/eer")


def summarize(sweep_dir: Path, optimized_metric: str | None = None, ended: str = "") -> str | None:
    """Write ``sweep_summary.csv`` and return it as a printable table (None: no jobs yet),
    with a line for each job that did not finish; ``ended``: how a sweep that did not reach
    its end ended (``a job failed``, ``stopped``), for its header."""
    order = [f"test/{n}" for n in (*EVAL_METRICS, *TEST_ONLY_METRICS)]
    rows = summary_rows(sweep_dir, order)
    if not rows:
        return None
    path = write_summary(sweep_dir, rows)
    override_keys = list(
        dict.fromkeys(
            k for r in rows for k in r if k not in ("job", "status", "error") and "/" not in k
        )
    )
    varying = [k for k in override_keys if len({r.get(k) for r in rows}) > 1] or override_keys
    metrics = [m for m in (optimized_metric, *PRINTED_METRICS) if m]
    metrics = [m for m in dict.fromkeys(metrics) if any(m in r for r in rows)]
    table = format_table(rows, ["job", "status", *varying, *metrics])
    endings = [f"job {r['job']} {r['status']}: {r['error']}" for r in rows if "error" in r]
    runs = f"{len(rows)} runs, {ended};" if ended else f"{len(rows)} runs,"
    return "\n".join([f"sweep summary ({runs} all columns in {path}):", table, *endings])


# The sweep this process is running: (sweep dir, optimized_metric), from SweepSummary's
# on_multirun_start to its on_multirun_end, for the task wrapper when the sweep stops early.
_running: tuple[Path, str | None] | None = None


def start_sweep(sweep_dir: Path, optimized_metric: str | None) -> None:
    """Record the sweep this process runs (``unfinished_summary`` reads it)."""
    global _running
    _running = (sweep_dir, optimized_metric)


def end_sweep() -> None:
    """The sweep reached its end: nothing is left unfinished."""
    global _running
    _running = None


def unfinished_summary(ended: str) -> str | None:
    """The table of the sweep this process was running when it ended with an error or a stop
    (``ended`` says which, in its header); None outside a sweep. The sweep is over
    afterwards. A failed job ends a local sweep only after the jobs of its batch ran."""
    running = _running
    end_sweep()
    return summarize(*running, ended=ended) if running else None
