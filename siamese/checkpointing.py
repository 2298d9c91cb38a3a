"""What a checkpoint must carry for an exact resume, and how it reaches the disk safely.

- ``rng_states`` / ``restore_rng_states``: the random streams (torch CPU and CUDA, numpy,
  Python) as plain tensors and ints, so ``weights_only=True`` loading accepts them.
  Augmentation and dropout draw from them; with them restored (and the loader's position,
  ``siamese.data.datamodule.ResumableLoader``), a run killed mid-epoch and resumed ends
  with the same weights as an uninterrupted run on the CPU.
- ``AtomicCheckpointIO``: writes each checkpoint to a temporary file in the same folder,
  fsyncs it and renames it over the old one, so a kill or a full disk during a save leaves
  the previous file intact; a failed write is one line naming the file and the reason.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from siamese.errors import SiameseError


class CheckpointWriteError(SiameseError, OSError):
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
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = (
                "free some space"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                else "check the folder's permissions"
            )
            kept = (
                "the previous checkpoint there is intact"
                if target.exists()
                else "no earlier checkpoint was there"
            )
            raise CheckpointWriteError(
                f"could not write checkpoint {str(target)!r}: {reason}; {kept}; {hint}, then "
                "resume with ckpt_path=last"
            ) from exc


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (not possible on every OS: best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
