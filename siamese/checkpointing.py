"""What a checkpoint must carry for an exact resume, and how it reaches the disk safely.

- ``rng_states`` / ``restore_rng_states``: the random streams (torch CPU and CUDA, numpy,
  Python) as plain tensors and ints, so ``weights_only=True`` loading accepts them.
  Augmentation and dropout draw from them; with them restored (and the loader's position,
  ``siamese.data.datamodule.ResumableLoader``), a run killed mid-epoch and resumed ends
  with the same weights as an uninterrupted run on the CPU.
- ``AtomicCheckpointIO``: writes each checkpoint to a temporary file in the same folder,
  fsyncs it and renames it over the old one, so a kill or a full disk during a save leaves
  the previous file intact; a failed write is one line naming the file and the reason
  (``siamese.exports.atomic_write``, which every other file a job writes goes through too)
  and says how to go on from what is on disk.
- ``RunRelativePaths``: ModelCheckpoint's paths (its folder, the best and last checkpoints)
  stored relative to the run folder and resolved against the folder being resumed, so a
  copied or moved run resumes from, tests and reports its own files.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from siamese.exports import WriteError, atomic_write


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (disk full, no permission): the old one is kept."""


def rng_states() -> dict[str, Any]:
    """This process's random states, as tensors and plain Python values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what ``rng_states`` saved (CUDA states only onto as many devices)."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``.<name>.tmp`` beside the target, fsync, then rename over it.

    Args:
        run_dir: the run folder, named in a failed save's way forward.
    """

    def __init__(self, run_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.run_dir = None if run_dir is None else Path(run_dir)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Resume and the test of the best checkpoint read plain data only, whatever
        # Lightning's or torch's default: a checkpoint is a file, never code.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        with atomic_write(
            path, what="checkpoint", then=self._way_forward(path), error=CheckpointWriteError
        ) as f:
            torch.save(checkpoint, f)

    def _way_forward(self, path: str | os.PathLike) -> str:
        """How to go on after a failed save: resume from last.ckpt when one is there;
        before the first one (a disk full at the first save) there is nothing to resume,
        and ``ckpt_path=auto`` starts the run over in its own folder (a plain re-run there
        is refused: the folder holds a run)."""
        run_dir = self.run_dir if self.run_dir is not None else Path(path).parent.parent
        last = Path(path).with_name("last.ckpt")
        where = f"hydra.run.dir={run_dir}"
        if last.is_file():
            return f"resume with ckpt_path=last {where}"
        return (
            f"run the same command with ckpt_path=auto {where} (no {last.name} was written "
            "yet, so it starts the run over there)"
        )


# ModelCheckpoint's state that names files.
_PATH_KEYS = ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path")


class RunRelativePaths(Callback):
    """Store ModelCheckpoint's paths relative to ``run_dir`` in each checkpoint and resolve
    them against the run folder being resumed.

    Lightning keeps them absolute, and when the folder is not the one it saved (a copied or
    moved run) it keeps only ``best_model_path``, the old folder's file: a copy would test
    and report the original's best.ckpt, a moved run fail to find it. Older checkpoints
    (absolute paths) are rebased from the folder they name onto this one. Paths outside the
    run folder (a ``dirpath`` set elsewhere) stay as they are."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(os.path.realpath(run_dir))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for cb, state in self._states(trainer, checkpoint):
            checkpoint["callbacks"][cb.state_key] = self._map(state, self._relative)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs before any callback's load_state_dict (Lightning's restore_callbacks).
        for cb, state in self._states(trainer, checkpoint):
            saved = state.get("dirpath")
            # An older checkpoint's absolute paths: from the folder it saved into to this
            # callback's folder, at the same relative place.
            old = Path(os.path.realpath(saved)) if saved and os.path.isabs(saved) else None
            new = cb.dirpath

            def resolve(path: str, old: Path | None = old, new: str | None = new) -> str:
                if not os.path.isabs(path):
                    return os.path.realpath(self.run_dir / path)
                real = Path(os.path.realpath(path))
                if old is not None and new and real.is_relative_to(old):
                    return os.path.normpath(os.path.join(new, real.relative_to(old)))
                return path

            checkpoint["callbacks"][cb.state_key] = self._map(state, resolve)

    @staticmethod
    def _states(
        trainer: pl.Trainer, checkpoint: dict[str, Any]
    ) -> list[tuple[ModelCheckpoint, dict[str, Any]]]:
        states = checkpoint.get("callbacks") or {}
        return [
            (cb, states[cb.state_key])
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and isinstance(states.get(cb.state_key), dict)
        ]

    @staticmethod
    def _map(state: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
        """A copy of ``state`` with each path mapped (the live best_k_models is not touched)."""
        out = dict(state)
        for name in _PATH_KEYS:
            if out.get(name):
                out[name] = fn(out[name])
        if isinstance(out.get("best_k_models"), dict):
            out["best_k_models"] = {fn(k) if k else k: v for k, v in out["best_k_models"].items()}
        return out

    def _relative(self, path: str) -> str:
        real = Path(os.path.realpath(path))
        if real.is_relative_to(self.run_dir):
            return real.relative_to(self.run_dir).as_posix()
        return path
