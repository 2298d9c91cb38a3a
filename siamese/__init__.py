"""siamese: train and evaluate Siamese (similarity) networks with Lightning, Hydra and FAISS."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING

from siamese.errors import ConfigError, DataError, SiameseError

if TYPE_CHECKING:
    from torch import Tensor

    from siamese.module import SiameseModule

__version__ = "0.1.0"


def load(ckpt_path: str | PathLike, map_location: str = "cpu") -> SiameseModule:
    """Rebuild a trained model from its checkpoint: ``.embed(images)``, ``.compare(a, b)``.

    Imported lazily so that ``import siamese`` stays light (no torch until it is needed).
    """
    from siamese.inference import load as _load

    return _load(ckpt_path, map_location=map_location)


def read_images(
    source: str | PathLike | Sequence[str | PathLike], like: SiameseModule
) -> tuple[Tensor, list[str]]:
    """A folder (or list) of image files as ``like`` expects them, and their paths."""
    from siamese.inference import read_images as _read

    return _read(source, like)


__all__ = ["ConfigError", "DataError", "SiameseError", "__version__", "load", "read_images"]
