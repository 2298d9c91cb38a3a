"""Sweeps: the metric a sweeper optimises, and ``sweep_summary.csv`` (one row per run).

The summary is read back from the job directories (``.hydra/overrides.yaml`` and
``metrics.json``), so it works the same for the basic launcher, submitit (jobs in other
processes or on other nodes) and any sweeper (grid, Optuna).
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

from siamese.errors import ConfigError
from siamese.metric_names import EVAL_METRICS, TEST_ONLY_METRICS, available_metrics

log = logging.getLogger(__name__)

SUMMARY_NAME = "sweep_summary.csv"


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
def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep (those with ``.hydra/overrides.yaml``), by job number."""
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(
        jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


def summary_rows(sweep_dir: Path, metric_order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per job: ``job``, ``status``, each override, then the job's metrics."""
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


def summarize(sweep_dir: Path, optimized_metric: str | None = None) -> str | None:
    """Write ``sweep_summary.csv`` and return it as a printable table (None: no jobs yet)."""
    order = [f"test/{n}" for n in (*EVAL_METRICS, *TEST_ONLY_METRICS)]
    rows = summary_rows(sweep_dir, order)
    if not rows:
        return None
    path = write_summary(sweep_dir, rows)
    override_keys = list(
        dict.fromkeys(k for r in rows for k in r if k not in ("job", "status") and "/" not in k)
    )
    varying = [k for k in override_keys if len({r.get(k) for r in rows}) > 1] or override_keys
    metrics = [m for m in (optimized_metric, *PRINTED_METRICS) if m]
    metrics = [m for m in dict.fromkeys(metrics) if any(m in r for r in rows)]
    table = format_table(rows, ["job", "status", *varying, *metrics])
    return f"sweep summary ({len(rows)} runs, all columns in {path}):\n{table}"
