"""siamese: train and evaluate Siamese (similarity) networks with Lightning, Hydra and FAISS."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING

from siamese.errors import ConfigError, DataError, SiameseError
from siamese.schemas import register as _register_schemas  # noqa: F401  (conf/'s schemas)

if TYPE_CHECKING:
    import faiss
    from torch import Tensor

    from siamese.exports import Embeddings
    from siamese.gallery import Gallery
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


def load_index(path: str | PathLike) -> faiss.Index:
    """The faiss index evaluate.py wrote (``index.faiss``); a damaged file is one DataError line."""
    from siamese.exports import load_index as _load_index

    return _load_index(path)


def load_embeddings(
    folder: str | PathLike, index: faiss.Index | str | PathLike | None = None
) -> Embeddings:
    """evaluate.py's ``embeddings/*.npy`` (``.query``, ``.query_labels``, ``.gallery``, ...).

    ``folder`` is the ``embeddings/`` folder or its run directory; with ``index`` (an index or
    its file) the gallery is checked against it. Plain numbers only: pickled objects, damaged
    files, mismatched shapes or NaN are one DataError line naming the file.
    """
    from siamese.exports import load_embeddings as _load_embeddings

    return _load_embeddings(folder, index=index)


def __getattr__(name: str) -> object:
    """``siamese.Gallery`` (a saved, searchable index of images), imported when first used."""
    if name == "Gallery":
        from siamese.gallery import Gallery

        return Gallery
    raise AttributeError(f"module 'siamese' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DataError",
    "Gallery",
    "SiameseError",
    "__version__",
    "load",
    "load_embeddings",
    "load_index",
    "read_images",
]
