"""The interface of a labelled image set, the three splits of a data set, and loader helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor
from torch.utils.data import Dataset

from siamese.data.datasets.bad_files import BadFiles

Batch = TypeVar("Batch")


class LabelledImages(Dataset):
    """Base class: images with integer class labels; items are float32 (C, H, W) in [0, 1]."""

    targets: Tensor  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return int(self.targets.numel())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every item."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int] | Tensor) -> LabelledImages:
        """The items at ``indices`` as a set of the same kind (classes keep their numbers)."""
        raise NotImplementedError

    def resized(self, image_size: tuple[int, int]) -> LabelledImages:
        """The same items delivered at ``image_size`` (H, W)."""
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(images, labels, kept)`` of the items at ``indices`` that can be read.

        For evaluation: where ``__getitems__`` (training) replaces a skipped unreadable image
        by another of its class, ``read`` leaves it out; ``kept`` (M,) int64 holds the item
        indices of the M rows, in the order asked for. In-memory sets keep every item.
        """
        images, labels = self.__getitems__(indices)
        return images, labels, torch.as_tensor(indices, dtype=torch.int64).reshape(-1)

    def with_bad_files(self, bad_files: BadFiles) -> LabelledImages:
        """The same items, unreadable files handled by ``bad_files`` (tensors have none)."""
        return self


class WithIndices(Dataset):
    """Batches of ``(images, labels, indices)``: evaluation puts embeddings back in item order,
    so metrics do not depend on the order batches were drawn in. Skipped unreadable images
    are left out (``LabelledImages.read``): a batch may have fewer rows than indices asked."""

    def __init__(self, images: LabelledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        return self.images.read(indices)


@dataclass
class DataSplits:
    """The three splits of one data set, and what a model needs to know about its images."""

    train: LabelledImages
    val: LabelledImages
    test: LabelledImages

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    def as_tuple(self) -> tuple[LabelledImages, LabelledImages, LabelledImages]:
        return self.train, self.val, self.test


def identity_collate(batch: Batch) -> Batch:
    """Collate for ``__getitems__`` datasets: the batch is already stacked."""
    return batch
