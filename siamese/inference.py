"""Load a trained model from its checkpoint alone: ``siamese.load(path).embed(images)``."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from siamese.data.datasets import UndecodableImage, decode_image
from siamese.data.sources import IMAGE_EXTENSIONS
from siamese.errors import ConfigError, DataError
from siamese.module import SiameseModule


def load(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> SiameseModule:
    """The SiameseModule saved in ``ckpt_path``, in eval mode, with ``.embed``/``.compare``."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise not_a_checkpoint_file(path, "pass a .ckpt from train.py")
    check_checkpoint(path)
    model = SiameseModule.load_from_checkpoint(path, map_location=map_location)
    return model.eval()


def not_a_checkpoint_file(path: Path, hint: str, key: str = "ckpt_path") -> ConfigError:
    """The error for a ``path`` that is no file: missing (``hint`` says what to pass), or
    a folder (a run directory, say), naming a checkpoint inside it when there is one."""
    if not path.is_dir():
        return ConfigError(f"{key}={str(path)!r} does not exist; {hint}")
    preferred = [path / "checkpoints" / "best.ckpt", path / "model.ckpt", path / "best.ckpt"]
    found = [p for p in preferred if p.is_file()] or sorted(path.rglob("*.ckpt"))[:1]
    inside = (
        f"pass a checkpoint file, e.g. {key}={found[0]}"
        if found
        else "it holds no .ckpt file; pass a checkpoint file written by train.py"
    )
    return ConfigError(f"{key}={str(path)!r} is a folder, not a checkpoint; {inside}")


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (plain data, on the CPU); a file that is not a readable
    Lightning checkpoint is refused, naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle of objects: a damaged or foreign file
            raise _unreadable(path, exc) from None
        what = f" ({found.group(1)})"
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds pickled Python objects{what} that would run code "
            "when loaded; siamese loads checkpoints as plain data only (weights_only=True) and "
            "refused it, running nothing: pass a .ckpt written by train.py, or re-save this one "
            "as tensors and plain values from code you trust"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds no model state_dict; pass a .ckpt file written by "
            "train.py"
        )
    return ckpt


def _unreadable(path: Path, exc: BaseException) -> ConfigError:
    text = str(exc).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # torch's real reason
    first_line = detail.group(1) if detail else (text.splitlines()[0] if text else "")
    # torch's zip reader goes on for sentences ("This is an internal miniz error. ...").
    reason = first_line.split(". ")[0].rstrip(".") or type(exc).__name__
    size = path.stat().st_size if path.is_file() else 0
    return ConfigError(
        f"ckpt_path={str(path)!r} is not a readable checkpoint ({size:,} bytes; {reason}): "
        "truncated or damaged, or not a checkpoint; pass a .ckpt file written by train.py"
    )


def read_images(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    like: SiameseModule,
) -> tuple[torch.Tensor, list[str]]:
    """Image files read as the model expects them: (N, C, H, W) floats in [0, 1], and paths.

    ``source`` is a folder (every image file below it, sorted by path) or a list of files;
    each is converted to the model's channels and resized to its input size. A file that
    cannot be decoded (damaged, empty, missing, not an image) is one DataError line naming
    it, after every file was tried (the count of the others is in it).
    """
    if isinstance(source, str | os.PathLike):
        root = Path(source).expanduser()
        if not root.is_dir():
            raise DataError(f"{str(root)!r} is not a folder; pass a folder of images or a list")
        paths = sorted(
            str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not paths:
            raise DataError(
                f"no image files in {str(root)!r} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})"
            )
    else:
        paths = [str(p) for p in source]
    channels, height, width = like.tower.input_shape
    images, bad = [], []
    for path in paths:
        try:
            images.append(decode_image(path, (height, width), channels))
        except UndecodableImage as exc:
            bad.append((path, exc.reason))
    if bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more of the {len(paths)} files)" if len(bad) > 1 else ""
        raise DataError(
            f"cannot read image {path!r} ({reason}){more}; fix or remove it, or leave it out of "
            "the files passed to read_images"
        )
    if not images:
        return torch.empty((0, channels, height, width)), paths
    return torch.stack(images), paths
