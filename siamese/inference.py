"""Load a trained model from its checkpoint alone: ``siamese.load(path).embed(images)``."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from siamese.errors import ConfigError
from siamese.module import SiameseModule


def load(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> SiameseModule:
    """The SiameseModule saved in ``ckpt_path``, in eval mode, with ``.embed``/``.compare``."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist; pass a .ckpt from train.py")
    check_checkpoint(path)
    model = SiameseModule.load_from_checkpoint(path, map_location=map_location)
    return model.eval()


def check_checkpoint(path: Path) -> None:
    """Refuse a file that is not a readable Lightning checkpoint, naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"ckpt_path={str(path)!r} is not a readable checkpoint ({first_line}); "
            "pass a .ckpt file written by train.py"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds no model state_dict; pass a .ckpt file written by "
            "train.py"
        )
