"""What a person sees at the terminal: no library chatter, and closing lines that say what next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lines the libraries print in a default run that say nothing a user can act on.
CHATTER = (
    "Tip: For seamless cloud",  # Lightning's advertising for litlogger
    "Trainer already configured with model summary callbacks",
    "LeafSpec",  # a deprecation warning from inside Lightning
    "Total FLOPs: 0",
    "GPU available:",
    "TPU available:",
)


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    # As a user runs it: warnings not silenced (run_script sets PYTHONWARNINGS=ignore).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["WANDB_MODE"] = "offline"
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # train.py in a subprocess, ~20 s; default suite under 5 minutes
def test_a_default_run_shows_no_library_chatter_and_ends_with_the_next_command(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(
        "train.py",
        "debug=fast",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout + proc.stderr
    for line in CHATTER:
        assert line not in shown, line
    # Kept in the run's log file (debug=fast names it debug.log).
    kept = (run_dir / "debug.log").read_text()
    assert "GPU available:" in kept and "Tip: For seamless cloud" in kept
    assert "LeafSpec" in kept
    # The model summary counts real FLOPs now that it has an example input.
    assert "Total FLOPs:" in shown
    last = [line for line in proc.stdout.splitlines() if line.strip()][-2:]
    assert last == [
        f"run folder: {run_dir}",
        f"next: python evaluate.py ckpt_path={run_dir}/checkpoints/best.ckpt",
    ]


@pytest.mark.slow
def test_evaluate_and_export_end_with_their_folder_and_next_step(tmp_path):
    run_dir, eval_dir, export_dir = tmp_path / "run", tmp_path / "eval", tmp_path / "export"
    fast = ["debug=fast", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    assert _run("train.py", *fast, "test=false", f"hydra.run.dir={run_dir}").returncode == 0
    ev = _run(
        "evaluate.py",
        f"ckpt_path={run_dir}/checkpoints/best.ckpt",
        "eval.plots=false",
        f"hydra.run.dir={eval_dir}",
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    for line in CHATTER:
        assert line not in ev.stdout + ev.stderr, line
    assert [line for line in ev.stdout.splitlines() if line.strip()][-3:] == [
        f"run folder: {eval_dir}",
        f"next: python index.py ckpt_path={eval_dir}/model.ckpt gallery=PATH/TO/IMAGES",
        f"  or: python export.py ckpt_path={eval_dir}/model.ckpt format=onnx",
    ]
    ex = _run("export.py", f"ckpt_path={eval_dir}/model.ckpt", f"hydra.run.dir={export_dir}")
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert [line for line in ex.stdout.splitlines() if line.strip()][-2:] == [
        f"run folder: {export_dir}",
        f"next: load {export_dir}/model.onnx as docs/export.md shows",
    ]
