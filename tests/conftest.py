"""Shared fixtures: composing the Hydra config the way train.py does, pointed at tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")

# A few batches of everything: enough to exercise every stage in seconds.
FAST = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.limit_train_batches=3",
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "eval_pairs=500",
]


def compose_train(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


def compose_eval(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("evaluate", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, fast: bool = True) -> DictConfig:
        return compose_train([*(FAST if fast else []), *overrides], tmp_path / "run")

    return make


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
