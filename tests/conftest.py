"""Fixtures and session set-up: offline caches, a config factory, and the shared trained runs."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

os.environ.setdefault("WANDB_MODE", "offline")
# No test downloads weights: siamese and huggingface_hub read HF_HUB_OFFLINE, and the
# libraries' caches are empty folders of this session (tests write the files they need).
os.environ["HF_HUB_OFFLINE"] = "1"
_CACHES = Path(tempfile.mkdtemp(prefix="siamese-test-caches-"))
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
os.environ["HF_HOME"] = str(_CACHES / "huggingface")
os.environ["TORCH_HOME"] = str(_CACHES / "torch")
os.environ.pop("HF_HUB_CACHE", None)

# After the environment above: these import siamese and the libraries that read it.
from helpers import (  # noqa: E402
    FAST,
    FAST_WITH_PLOTS,
    PLOTS_LIKE_EVAL,
    TRAINED,
    Payload,
    compose_train,
)

from siamese.pipelines.train import run_training  # noqa: E402


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make(*overrides)``: the train config, FAST (or with plots) unless ``fast=False``."""

    def make(*overrides: str, fast: bool = True, plots: bool = False) -> DictConfig:
        quick = (FAST_WITH_PLOTS if plots else FAST) if fast else []
        return compose_train([*quick, *overrides], tmp_path / "run")

    return make


# -- trained runs that several test modules read (each trained once a session) -----------
@pytest.fixture(scope="session")
def evaluate_trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch run with the dashboard drawn as evaluate.py draws (evaluate's tests)."""
    out = tmp_path_factory.mktemp("train")
    fit = ["trainer.max_epochs=2", "trainer.limit_train_batches=10", *PLOTS_LIKE_EVAL]
    run_training(compose_train([*FAST_WITH_PLOTS, *fit], out))
    return out


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A FAST default run, read only: its folder and the metrics run_training returned."""
    out = tmp_path_factory.mktemp("train")
    return out, run_training(compose_train(FAST, out))


@pytest.fixture(scope="session")
def export_ckpt(fast_run: tuple[Path, dict]) -> Path:
    """best.ckpt of the FAST default run (export's tests)."""
    return fast_run[0] / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="session")
def real_ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A TRAINED run's best.ckpt: its path and its contents (safe-loading tests)."""
    out = tmp_path_factory.mktemp("train")
    cfg = compose_train(TRAINED, out)
    run_training(cfg)
    path = out / "checkpoints" / "best.ckpt"
    return {"path": path, "ckpt": torch.load(path, weights_only=True)}


@pytest.fixture
def attack(tmp_path, real_ckpt):
    """``make(edit)``: a copy of the real checkpoint changed by ``edit(ckpt, payload)``,
    saved in tmp_path; ``marker`` is the file the payload would create."""
    marker = tmp_path / "PWNED"
    payload = tmp_path / "payload.pt"
    torch.save({"x": Payload(marker)}, payload)

    def make(edit) -> Path:
        ckpt = copy.deepcopy(real_ckpt["ckpt"])
        edit(ckpt, {"_target_": "torch.load", "f": str(payload), "weights_only": False})
        path = tmp_path / "evil.ckpt"
        torch.save(ckpt, path)
        return path

    make.marker = marker
    return make
