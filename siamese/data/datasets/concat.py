"""Several labelled image sets of the same classes and image shape, read as one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from siamese.data.datasets.bad_files import BadFiles
from siamese.data.datasets.base import LabelledImages
from siamese.errors import DataError


class ConcatImages(LabelledImages):
    """Several sets of the same classes and image shape, read as one (e.g. every split).

    Refuses sets whose class lists differ: their label numbers would mean different classes.
    """

    def __init__(self, parts: Sequence[LabelledImages]) -> None:
        if not parts:
            raise DataError("nothing to concatenate: pass at least one set of images")
        first = parts[0]
        for part in parts[1:]:
            if part.classes != first.classes or part.image_shape != first.image_shape:
                raise DataError(
                    "the splits have different classes or image shapes, so their labels "
                    "cannot be merged; evaluate one split at a time"
                )
        self.parts = list(parts)
        self.classes = list(first.classes)
        self.targets = torch.cat([p.targets for p in parts])
        self._starts = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        part = torch.searchsorted(self._starts, idx, right=True) - 1
        images = torch.empty((len(idx), *self.image_shape))
        for p in part.unique().tolist():
            where = (part == p).nonzero().squeeze(1)
            local = (idx[where] - self._starts[p]).tolist()
            images[where] = self.parts[p].__getitems__(local)[0]
        return images, self.targets[idx]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.parts[0].image_shape

    def subset(self, indices: Sequence[int] | Tensor) -> LabelledImages:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) == 0:
            return self.parts[0].subset(idx)
        part = torch.searchsorted(self._starts, idx, right=True) - 1
        # Consecutive runs from one part keep the order of ``indices``.
        breaks = (part[1:] != part[:-1]).nonzero().squeeze(1) + 1
        runs = torch.tensor_split(torch.arange(len(idx)), breaks)
        return ConcatImages(
            [self.parts[int(part[r[0]])].subset(idx[r] - self._starts[part[r[0]]]) for r in runs]
        )

    def read(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        part = torch.searchsorted(self._starts, idx, right=True) - 1
        images = torch.empty((len(idx), *self.image_shape))
        kept = torch.zeros(len(idx), dtype=torch.bool)
        for p in part.unique().tolist():
            where = (part == p).nonzero().squeeze(1)
            local = idx[where] - self._starts[p]
            got, _, got_items = self.parts[p].read(local.tolist())
            # A file is readable or not wherever it is asked for: membership is enough.
            rows = where[torch.isin(local, got_items)]
            images[rows] = got.to(images.device)
            kept[rows] = True
        return images[kept], self.targets[idx[kept]], idx[kept]

    def resized(self, image_size: tuple[int, int]) -> ConcatImages:
        return ConcatImages([p.resized(image_size) for p in self.parts])

    def with_bad_files(self, bad_files: BadFiles) -> ConcatImages:
        return ConcatImages([p.with_bad_files(bad_files) for p in self.parts])
