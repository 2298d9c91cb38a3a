"""Hydra callbacks: refuse to start a fresh run in a directory that already holds a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from siamese.cli import fail


class RunDirGuard(Callback):
    """Stops before Hydra writes anything when ``hydra.run.dir`` holds an earlier run's
    checkpoints or metrics and the command does not resume that run (``ckpt_path=last`` or a
    checkpoint inside it)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last" or (
            ckpt_path and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())
        ):
            return
        taken = [name for name in ("checkpoints", "metrics.json") if (run_dir / name).exists()]
        if taken:
            fail(
                f"hydra.run.dir={str(run_dir)!r} already holds a run ({', '.join(taken)}); "
                "choose another hydra.run.dir, or pass ckpt_path=last to resume that run "
                "(nothing in it was changed)"
            )
