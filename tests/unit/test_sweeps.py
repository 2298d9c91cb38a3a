"""Sweeps: the optimised metric, sweep_summary.csv, Optuna and the submitit launcher."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus

from siamese.errors import ConfigError
from siamese.metric_names import available_metrics
from siamese.pipelines.train import run_training
from siamese.sweeps import (
    check_optimized_metric,
    format_table,
    optimized_value,
    summarize,
    summary_rows,
)


def write_job(sweep, name, overrides, report=None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if report is not None:
        (job / "metrics.json").write_text(json.dumps(report))


def test_summary_has_one_row_per_job_with_overrides_and_metrics(tmp_path):
    write_job(
        tmp_path,
        "1",
        ["loss=triplet", "optimizer.lr=0.001"],
        {
            "protocol": "p",
            "test/precision_at_1": 0.5,
            "optimized_metric": "val/precision_at_1",
            "val/precision_at_1": 0.4,
        },
    )
    write_job(
        tmp_path, "0", ["loss=contrastive", "optimizer.lr=0.01"], {"test/precision_at_1": 0.75}
    )
    write_job(tmp_path, "10", ["loss=bce", "optimizer.lr=0.1"])  # failed: no metrics.json
    (tmp_path / "notes").mkdir()  # not a job

    text = summarize(tmp_path, "val/precision_at_1")
    with (tmp_path / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "10"]  # numeric order, not "0", "1", "10" by luck
    assert [r["loss"] for r in rows] == ["contrastive", "triplet", "bce"]
    assert [r["status"] for r in rows] == ["done", "done", "no metrics.json"]
    assert [r["test/precision_at_1"] for r in rows] == ["0.75", "0.5", ""]
    assert rows[1]["val/precision_at_1"] == "0.4" and rows[0]["val/precision_at_1"] == ""
    assert "protocol" not in rows[0]  # strings of metrics.json are not metrics
    lines = text.splitlines()
    assert lines[0].startswith("sweep summary (3 runs")
    assert lines[1].split() == [
        "job",
        "status",
        "loss",
        "optimizer.lr",
        "val/precision_at_1",
        "test/precision_at_1",
    ]
    assert lines[3].split() == ["0", "done", "contrastive", "0.01", "0.7500"]
    assert lines[4].split() == ["1", "done", "triplet", "0.001", "0.4000", "0.5000"]


@pytest.fixture
def sweep_callback(monkeypatch):
    """A SweepSummary as Hydra drives it in a local sweep."""
    from siamese import hydra_callbacks, sweeps

    monkeypatch.setattr(hydra_callbacks, "_multirun", lambda: True)
    monkeypatch.setenv(hydra_callbacks.SWEEP_DIR_ENV, "")  # restored after the test
    monkeypatch.setattr(sweeps, "_running", None)
    return hydra_callbacks.SweepSummary()


def job_config(sweep, name):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "optimized_metric": None,
            "hydra": {"sweep": {"dir": str(sweep)}, "runtime": {"output_dir": str(sweep / name)}},
        }
    )


def run_job(callback, sweep, name, error=None):
    """on_job_start, then on_job_end with the JobReturn Hydra's run_job gives."""
    from hydra.core.utils import JobReturn, JobStatus

    config = job_config(sweep, name)
    callback.on_job_start(config=config)
    ret = JobReturn(status=JobStatus.FAILED if error else JobStatus.COMPLETED)
    ret.return_value = error if error else 1.0
    callback.on_job_end(config=config, job_return=ret)


def test_a_job_that_raised_is_a_failed_row_with_its_error_line(tmp_path, sweep_callback):
    from hydra.errors import InstantiationException

    callback = sweep_callback
    write_job(tmp_path, "0", ["seed=1"], {"test/precision_at_1": 0.75})
    write_job(tmp_path, "1", ["seed=2"])
    # Metrics written, then a failure: the row must not say done.
    write_job(tmp_path, "2", ["seed=3"], {"test/precision_at_1": 0.5})
    run_job(callback, tmp_path, "0")
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nsee the allocator docs")
    run_job(callback, tmp_path, "1", error=oom)
    wrapped = InstantiationException("Error in call to target 'siamese.models.ConvTower'")
    wrapped.__cause__ = ConfigError("model.embedding_dim must be a positive integer, got 0")
    run_job(callback, tmp_path, "2", error=wrapped)

    with (tmp_path / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done", "failed", "failed"]
    assert [r["error"] for r in rows] == [
        "",
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "model.embedding_dim must be a positive integer, got 0",  # the user error's own line
    ]
    assert [r["test/precision_at_1"] for r in rows] == ["0.75", "", "0.5"]
    assert json.loads((tmp_path / "1" / "job_status.json").read_text()) == {
        "status": "failed",
        "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
    }
    lines = summarize(tmp_path).splitlines()
    assert lines[0] == f"sweep summary (3 runs, all columns in {tmp_path / 'sweep_summary.csv'}):"
    assert lines[1].split() == ["job", "status", "seed", "test/precision_at_1"]  # no error column
    assert lines[4].split() == ["1", "failed", "2"]
    assert lines[6:] == [
        "job 1 failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "job 2 failed: model.embedding_dim must be a positive integer, got 0",
    ]


def test_a_job_stopped_by_ctrl_c_is_a_stopped_row_and_the_table_is_printed(
    tmp_path, sweep_callback, capsys, monkeypatch
):
    """Ctrl-C inside a job leaves Hydra's run_job (a BaseException): no on_job_end. The task
    wrapper marks the job stopped, and prints the table as the sweep's end would have."""
    from siamese import task

    callback = sweep_callback
    sweep = job_config(tmp_path, "0")
    callback.on_multirun_start(config=sweep)
    write_job(tmp_path, "0", ["seed=1"], {"test/precision_at_1": 0.75})
    # An earlier attempt of job 0 (requeued) stopped; this one finishes.
    (tmp_path / "0" / "job_status.json").write_text('{"status": "stopped", "error": "x"}')
    run_job(callback, tmp_path, "0")
    write_job(tmp_path, "1", ["seed=2"])
    callback.on_job_start(config=job_config(tmp_path, "1"))
    monkeypatch.setattr(task, "_sweep_job_dir", lambda: tmp_path / "1")

    @task.task_wrapper
    def job() -> None:
        raise KeyboardInterrupt

    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        task.run(job, "train", [])
    assert stopped.value.code == 130

    with (tmp_path / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["error"]) for r in rows] == [
        ("0", "done", ""),
        ("1", "stopped", "Ctrl-C (SIGINT)"),
    ]
    printed = capsys.readouterr().out.splitlines()
    path = tmp_path / "sweep_summary.csv"
    assert printed[0] == f"sweep summary (2 runs, stopped by Ctrl-C; all columns in {path}):"
    assert printed[3].split() == ["0", "done", "1", "0.7500"]
    assert printed[4].split() == ["1", "stopped", "2"]
    assert printed[5:] == ["job 1 stopped: Ctrl-C (SIGINT)"]

    # A sweep that reaches its end leaves nothing unfinished behind.
    callback.on_multirun_start(config=sweep)
    callback.on_job_start(config=job_config(tmp_path, "1"))
    ret = JobReturn(status=JobStatus.COMPLETED)
    ret.return_value = 1.0
    callback.on_job_end(config=job_config(tmp_path, "1"), job_return=ret)
    callback.on_multirun_end(config=sweep)
    assert not (tmp_path / "1" / "job_status.json").exists()  # cleared when it started again
    from siamese.sweeps import unfinished_summary

    assert unfinished_summary("stopped") is None


def test_summary_rows_order_metrics_as_asked(tmp_path):
    write_job(tmp_path, "0", ["seed=1"], {"test/b": 2.0, "test/a": 1.0, "test/c": 3.0})
    row = summary_rows(tmp_path, ["test/c", "test/a"])[0]
    assert list(row) == ["job", "status", "seed", "test/c", "test/a", "test/b"]


def test_format_table_aligns_columns():
    table = format_table([{"a": "x", "b": 0.123456}, {"a": "long", "b": float("nan")}], ["a", "b"])
    assert table.splitlines() == ["a     b     ", "----  ------", "x     0.1235", "long  nan   "]


def test_unknown_metric_names_the_closest_and_every_available():
    check_optimized_metric("val/precision_at_1")
    check_optimized_metric(None)
    with pytest.raises(ConfigError) as err:
        check_optimized_metric("val/precison_at_1")
    message = str(err.value)
    assert "did you mean val/precision_at_1?" in message
    assert all(name in message for name in available_metrics())


def test_optimized_value_missing_after_training_lists_logged_metrics():
    assert optimized_value("val/x", {"val/x": 0.5, "epoch": 1}) == 0.5
    assert optimized_value(None, {}) is None
    with pytest.raises(ConfigError, match=r"val/recall_at_10.*logged: val/x"):
        optimized_value("val/recall_at_10", {"val/x": 0.5})


def test_a_single_run_without_the_optimized_metric_warns_and_finishes(caplog):
    with caplog.at_level("WARNING", logger="siamese.sweeps"):
        assert optimized_value("val/precision_at_1", {"epoch": 1}, sweeping=False) is None
    assert caplog.messages == [
        "optimized_metric='val/precision_at_1' was not logged by this run (no validation ran, "
        "or a recall@k or one-shot key needs a larger split); logged: nothing; a sweep (-m) "
        "would stop here"
    ]


@pytest.mark.slow  # ~4 s: a fit (default suite under 5 minutes)
def test_the_optimised_value_is_the_best_epoch_that_was_tested(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=3", "trainer.limit_train_batches=2")
    metrics = run_training(cfg)
    out = tmp_path / "run"
    with (out / "csv" / "metrics.csv").open() as f:
        per_epoch = [
            float(r["val/precision_at_1"]) for r in csv.DictReader(f) if r.get("val/precision_at_1")
        ]
    assert len(per_epoch) == 3
    report = json.loads((out / "metrics.json").read_text())
    assert report["optimized_metric"] == "val/precision_at_1"
    assert report["val/precision_at_1"] == pytest.approx(max(per_epoch))
    assert metrics["val/precision_at_1"] == pytest.approx(max(per_epoch))


def test_slurm_launcher_config_composes_with_its_key_settings(tmp_path):
    from helpers import CONF
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu"
    for key in (
        "timeout_min",
        "nodes",
        "gpus_per_node",
        "tasks_per_node",
        "cpus_per_task",
        "mem_gb",
        "max_num_timeout",
        "account",
        "qos",
    ):
        assert key in launcher
