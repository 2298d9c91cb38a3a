"""The service tests' gallery: 8 small grey images of two classes, a tiny untrained model
saved as a checkpoint with threshold 0.5, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_checkpoint, write_class_folders

from siamese.gallery import Gallery
from siamese.inference import load


@pytest.fixture(scope="session")
def gallery_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, image folder): root/cat/00{0..3}.png and root/dog/00{0..3}.png, 12x12."""
    base = tmp_path_factory.mktemp("service")
    ckpt = tiny_checkpoint(base / "tiny.ckpt", threshold=0.5)
    root = write_class_folders(base / "images", {"cat": 4, "dog": 4}, size=12)
    return ckpt, root


@pytest.fixture(scope="session")
def gallery(gallery_files: tuple[Path, Path]) -> Gallery:
    """The gallery of ``gallery_files`` (flat index); tests must not change it."""
    ckpt, root = gallery_files
    return Gallery.build(load(ckpt), root, ckpt_path=ckpt)
