"""What a checkpoint must carry for an exact resume, and how it reaches the disk safely.

- ``rng_states`` / ``restore_rng_states``: the random streams (torch CPU and CUDA, numpy,
  Python) as plain tensors and ints, so ``weights_only=True`` loading accepts them.
  Augmentation and dropout draw from them; with them restored (and the loader's position,
  ``siamese.data.datamodule.ResumableLoader``), a run killed mid-epoch and resumed ends
  with the same weights as an uninterrupted run on the CPU.
- ``AtomicCheckpointIO``: writes each checkpoint to a temporary file in the same folder,
  fsyncs it and renames it over the old one, so a kill or a full disk during a save leaves
  the previous file intact; a failed write is one line naming the file and the reason
  (``siamese.exports.atomic_write``, which every other file a job writes goes through too).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
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
    """``torch.save`` into ``.<name>.tmp`` beside the target, fsync, then rename over it."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        with atomic_write(
            path,
            what="checkpoint",
            then="resume with ckpt_path=last",
            error=CheckpointWriteError,
        ) as f:
            torch.save(checkpoint, f)
