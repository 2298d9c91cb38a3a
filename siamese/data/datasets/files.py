"""Labelled images read from files on demand, unreadable ones refused or replaced."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from siamese.data.datasets.bad_files import BadFiles, ImageReadError
from siamese.data.datasets.base import LabelledImages
from siamese.data.datasets.decode import UndecodableImage, decode_image
from siamese.errors import DataError


class FileImages(LabelledImages):
    """Images read from files on demand, converted to ``channels`` and resized to ``image_size``.

    Nothing is opened at construction, so a folder of many files indexes quickly. A file that
    cannot be decoded is refused or skipped as ``bad_files`` says (default: refused, with a
    one-line ImageReadError naming it).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Tensor | Sequence[int],
        classes: Sequence[str],
        image_size: tuple[int, int],
        channels: int,
        bad_files: BadFiles | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise DataError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.paths = [str(p) for p in paths]
        self.targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
        if len(self.paths) != self.targets.numel():
            raise DataError(f"{len(self.paths)} files but {self.targets.numel()} labels")
        self.classes = list(classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = channels
        self.bad_files = bad_files if bad_files is not None else BadFiles()

    def _read_one(self, index: int) -> Tensor | None:
        """Item ``index``'s image, or None when it is unreadable and skipped."""
        path = self.paths[index]
        if path in self.bad_files.known:
            return None
        try:
            return decode_image(path, self.image_size, self.channels)
        except UndecodableImage as exc:
            self.bad_files.failed(path, exc.reason)  # raises unless skipping
            return None

    def _stand_in(self, index: int) -> Tensor:
        """A readable image of item ``index``'s class in place of its unreadable one: the
        next of that class in item order, cycling (deterministic, same label)."""
        label = int(self.targets[index])
        members = (self.targets == label).nonzero().squeeze(1).tolist()
        at = members.index(index)
        for other in members[at + 1 :] + members[:at]:
            image = self._read_one(other)
            if image is not None:
                return image
        path = self.paths[index]
        raise ImageReadError(
            f"every image of class {self.classes[label]!r} in this split is unreadable "
            f"({len(members)} file(s), e.g. {path!r}: {self.bad_files.known.get(path)}); "
            "fix or remove them, or remove the class folder"
        )

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        images = []
        for i in idx.tolist():
            image = self._read_one(i)
            images.append(image if image is not None else self._stand_in(i))
        return self._stack(images), self.targets[idx]

    def read(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        read = [(i, self._read_one(i)) for i in idx]
        kept = torch.as_tensor([i for i, image in read if image is not None], dtype=torch.int64)
        images = self._stack([image for _, image in read if image is not None])
        return images, self.targets[kept], kept

    def _stack(self, images: list[Tensor]) -> Tensor:
        return torch.stack(images) if images else torch.empty((0, *self.image_shape))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size[0], self.image_size[1]

    def _like(
        self,
        paths: list[str] | None = None,
        targets: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        bad_files: BadFiles | None = None,
    ) -> FileImages:
        """A copy with some of its files, size or bad-file policy replaced."""
        return FileImages(
            self.paths if paths is None else paths,
            self.targets if targets is None else targets,
            self.classes,
            image_size or self.image_size,
            self.channels,
            bad_files or self.bad_files,
        )

    def resized(self, image_size: tuple[int, int]) -> FileImages:
        return self._like(image_size=image_size)

    def subset(self, indices: Sequence[int] | Tensor) -> FileImages:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        return self._like([self.paths[i] for i in idx], self.targets[idx])

    def with_bad_files(self, bad_files: BadFiles) -> FileImages:
        return self._like(bad_files=bad_files)
