"""Shared fixtures: composing the Hydra config the way train.py does, pointed at tmp_path."""

from __future__ import annotations

import atexit
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
# No test downloads weights: siamese and huggingface_hub read HF_HUB_OFFLINE, and the
# libraries' caches are empty folders of this session (tests write the files they need).
os.environ["HF_HUB_OFFLINE"] = "1"
_CACHES = Path(tempfile.mkdtemp(prefix="siamese-test-caches-"))
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
os.environ["HF_HOME"] = str(_CACHES / "huggingface")
os.environ["TORCH_HOME"] = str(_CACHES / "torch")
os.environ.pop("HF_HUB_CACHE", None)

# A few batches of everything: enough to exercise every stage in seconds.
FAST_WITH_PLOTS = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.limit_train_batches=3",
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "eval_pairs=500",
]
# Dashboard pictures cost ~3 s a run; tests/test_callbacks.py checks them with FAST_WITH_PLOTS.
FAST = [*FAST_WITH_PLOTS, "~callbacks.plots"]


def compose_config(name: str, overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """``conf/<name>.yaml`` with overrides, its run directory pointed at ``output_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


def compose_train(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    return compose_config("train", overrides, output_dir)


def compose_eval(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    return compose_config("evaluate", overrides, output_dir)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, fast: bool = True, plots: bool = False) -> DictConfig:
        quick = (FAST_WITH_PLOTS if plots else FAST) if fast else []
        return compose_train([*quick, *overrides], tmp_path / "run")

    return make


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line of a run that failed as bad input (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: int = 300):
    """Run an entry point as a user would; returns the CompletedProcess."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_scripts(
    runs: Sequence[tuple[str, Sequence[str]]], cwd: Path = ROOT, timeout: int = 300
) -> list[subprocess.CompletedProcess]:
    """Run independent entry-point commands at the same time (each as ``run_script``);
    start-up dominates short runs, so two cores finish them in about half the time."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / script), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script, args in runs
    ]
    done = []
    for (script, args), proc in zip(runs, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess([script, *args], proc.returncode, out, err))
    return done


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``run-<id>.wandb`` file (a LevelDB-style log).

    A 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a
    7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", data[:7]
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        assert pos + 7 + length <= len(data), f"{path} ends inside a record"
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records
