"""What a gallery holds besides vectors: one ``Item`` per indexed image, and listing a source.

An item is an image file under one of the gallery's root folders (``path`` relative to it,
the class folder's name as ``label``) or an image given in memory (no path, no root).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from siamese.data.sources import IMAGE_EXTENSIONS, list_files
from siamese.errors import DataError

IN_MEMORY = -1  # the root of an image given as a tensor: no file


@dataclass(frozen=True)
class Item:
    """One indexed image: a row of ``items.csv``, of the index and of ``embeddings.npy``.

    ``path`` is posix and relative to ``roots[root]`` ("" for an image given in memory);
    ``label`` is the class folder's name (the first folder below the root), "" where the
    image lies directly in the root or was given without one.
    """

    id: int
    path: str
    label: str
    root: int


@dataclass
class Listing:
    """Image files found in a source: the root they are relative to, paths, labels."""

    root: str  # absolute
    paths: list[str]  # relative posix paths, sorted
    labels: list[str]


def label_of(relative: str) -> str:
    """The class folder's name of a relative path (``cat/x.png`` -> ``cat``), else ""."""
    parts = PurePosixPath(relative).parts
    return parts[0] if len(parts) > 1 else ""


def list_source(
    source: str | os.PathLike | Sequence[str | os.PathLike], key: str = "gallery"
) -> Listing:
    """The image files of a folder (every image below it, sorted, hidden files and
    ``__MACOSX`` left out, linked folders followed; the label is the first folder below the
    root) or of a list of files (relative to their common folder; the label is the folder
    each lies in). One DataError line when there is none."""
    if isinstance(source, str | os.PathLike):
        root = Path(source).expanduser().absolute()
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a folder"
            raise DataError(
                f"{key}={str(source)!r} {what}; pass a folder of images (root/<class>/<image>, "
                "or images directly in it)"
            )
        files = list_files(str(root)).images
        if not files:
            raise DataError(
                f"{key}={str(source)!r} holds no image files (looked for "
                f"{' '.join(sorted(IMAGE_EXTENSIONS))}); pass a folder of images"
            )
    else:
        files = [str(Path(p).expanduser().absolute()) for p in source]
        if not files:
            raise DataError(f"{key} is an empty list; pass image files or a folder")
        root = Path(os.path.commonpath([os.path.dirname(f) for f in files]))
    relative = [Path(f).relative_to(root).as_posix() for f in files]
    order = sorted(range(len(relative)), key=relative.__getitem__)
    paths = [relative[i] for i in order]
    if isinstance(source, str | os.PathLike):
        return Listing(str(root), paths, [label_of(p) for p in paths])
    return Listing(str(root), paths, [Path(files[i]).parent.name for i in order])


def safe_relative(path: str) -> bool:
    """Whether ``path`` (read from items.csv) stays inside its root: relative, no ``..``."""
    pure = PurePosixPath(path)
    return bool(path) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in path
