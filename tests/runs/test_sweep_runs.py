"""Sweeps from the command line and a pre-empted submitit job resuming in its own folder."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FAST, ROOT, one_line_error, run_scripts

TINY = [*FAST, "trainer.limit_train_batches=1"]


@pytest.mark.slow  # command-line sweeps, ~25 s
def test_sweeps_from_the_command_line(tmp_path):
    """Three sweeps side by side (start-up is most of each one's time): an unknown
    optimized_metric stops before any job; Optuna runs two trials; the submitit launcher
    runs a grid."""
    unknown, optuna, grid = tmp_path / "unknown", tmp_path / "optuna", tmp_path / "grid"
    bad, tuned, launched = run_scripts(
        [
            (
                "train.py",
                ["-m", "seed=1,2", "optimized_metric=val/acc", f"hydra.sweep.dir={unknown}"],
            ),
            (
                "train.py",
                [
                    "hparams_search=optuna",
                    "hydra.sweeper.n_trials=2",
                    *TINY,
                    "test=false",  # the trials are compared on val/ (and CI time is short)
                    f"hydra.sweep.dir={optuna}",
                ],
            ),
            (
                "train.py",
                [
                    "-m",
                    "hydra/launcher=submitit_local",
                    "loss=contrastive,triplet",
                    *TINY,
                    f"hydra.sweep.dir={grid}",
                ],
            ),
        ]
    )
    line = one_line_error(bad)
    assert "optimized_metric='val/acc'" in line and "val/precision_at_1" in line
    assert not unknown.exists()

    # Optuna: two trials, each with its own sampled values; the best is the best row.
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    result = yaml.safe_load((optuna / "optimization_results.yaml").read_text())
    with (optuna / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
    values = [float(r["val/precision_at_1"]) for r in rows]
    assert result["best_value"] == pytest.approx(max(values))
    assert set(result["best_params"]) == {
        "optimizer.lr",
        "loss.margin",
        "model.embedding_dim",
        "data.samples_per_class",
    }
    for row in rows:
        assert 1e-4 <= float(row["optimizer.lr"]) <= 1e-2
        assert 0.5 <= float(row["loss.margin"]) <= 1.5
    assert "sweep summary (2 runs" in tuned.stdout

    # submitit: the grid in order, each job's metrics in the summary.
    assert launched.returncode == 0, launched.stderr[-3000:]
    with (grid / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["loss"] for r in rows] == ["contrastive", "triplet"]
    for job in ("0", "1"):
        report = json.loads((grid / job / "metrics.json").read_text())
        assert float(rows[int(job)]["test/precision_at_1"]) == pytest.approx(
            report["test/precision_at_1"]
        )
    assert (grid / ".submitit").is_dir()


def _submitit_task(folder: Path) -> int | None:
    """The pid of the submitit task process running a job from ``folder`` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and any(str(folder) in a for a in cmdline):
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process in /proc")
def test_a_preempted_submitit_job_resumes_in_its_own_run_directory(tmp_path: Path):
    """submitit's requeue signal (SIGUSR2, what SLURM sends before a timeout or a
    pre-emption) stops the job; submitit starts it again from its pickled launcher, and
    with ckpt_path=auto it finds its own run directory and resumes from last.ckpt."""
    grid = tmp_path / "grid"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        *FAST,
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=null",
        "checkpoints.every_n_train_steps=5",
        "ckpt_path=auto",
        f"hydra.sweep.dir={grid}",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        last = grid / "0" / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 240
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        task = _submitit_task(grid / ".submitit")
        assert task is not None and proc.poll() is None, "the job ended before the signal"
        step_at_signal = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
        os.kill(task, signal.SIGUSR2)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]

    log = (grid / "0" / "train.log").read_text()
    assert "Requeued job" in log
    assert log.count("ckpt_path=auto: no checkpoint in") == 1
    # The signal was held until the running batch ended and last.ckpt was written there,
    # after the every-5-steps save it was sent at; the requeued job resumed at that step.
    saved = re.findall(r"SIGUSR2: last\.ckpt written at step (\d+); handing the signal on", log)
    assert len(saved) == 1 and int(saved[0]) > step_at_signal, log[-3000:]
    assert log.count(f"ckpt_path=auto: resuming from {last} (epoch 0, step {saved[0]})") == 1
    assert f"Restored all states from the checkpoint at {last}" in log
    assert sorted(p.name for p in grid.iterdir() if p.is_dir() and p.name.isdigit()) == ["0"]
    # Three whole epochs in all (an epoch of the embedded digits is 21 class-balanced
    # batches), not three plus the steps before the signal.
    final = torch.load(last, map_location="cpu", weights_only=False)
    batches = final["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert final["epoch"] == 2 and batches["current"]["completed"] == 21
    assert final["global_step"] == batches["total"]["completed"] == 63
    assert 5 <= step_at_signal < 63
    assert (grid / "0" / "metrics.json").is_file()
    with (grid / "sweep_summary.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done"]
    assert stdout.count("sweep summary (1 runs") == 1
