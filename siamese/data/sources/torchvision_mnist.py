"""MNIST, Fashion-MNIST and KMNIST through torchvision, with offline IDX files checked first."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np

from siamese.data.datasets import DataSplits, TensorImages
from siamese.data.sources.base import check_count, check_seed, download_root, tidy_on_failure
from siamese.data.sources.split import check_train_pairs, stratified_split
from siamese.errors import ConfigError, DataError

_MNIST_FAMILY = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
_IDX_FILES = {  # file name -> (magic number, number of dimensions)
    "train-images-idx3-ubyte": (2051, 3),
    "train-labels-idx1-ubyte": (2049, 1),
    "t10k-images-idx3-ubyte": (2051, 3),
    "t10k-labels-idx1-ubyte": (2049, 1),
}


class TorchvisionMNIST:
    """MNIST, Fashion-MNIST or KMNIST through torchvision, held in memory as uint8 tensors.

    The official train split is divided into train and a stratified validation split; the
    official test split is the test split.

    Args:
        name: ``mnist``, ``fashion_mnist`` or ``kmnist``.
        download: fetch the files into ``root`` when they are missing.
        val_size: training images held out for validation, stratified by class.
        seed: seed of the split.
    """

    def __init__(
        self, name: str = "mnist", download: bool = True, val_size: int = 5000, seed: int = 0
    ) -> None:
        if name not in _MNIST_FAMILY:
            raise ConfigError(
                f"data.source.name {name!r} is not one of the MNIST family; "
                f"use one of {', '.join(_MNIST_FAMILY)}"
            )
        self.name = name
        self.download = bool(download)
        self.val_size = check_count("val_size", val_size)
        self.seed = check_seed(seed)

    def load(self, root: str | os.PathLike | None) -> DataSplits:
        import torchvision.datasets

        cls_name = _MNIST_FAMILY[self.name]
        root = download_root(root, cls_name)
        raw = os.path.join(root, cls_name, "raw")
        _gunzip_missing(raw)
        _check_idx_files(raw)
        cls = getattr(torchvision.datasets, cls_name)
        try:
            with tidy_on_failure(root, os.path.dirname(raw), raw):
                official_train = cls(root, train=True, download=self.download)
                official_test = cls(root, train=False, download=self.download)
        except RuntimeError as exc:  # torchvision's "Dataset not found" and failed mirrors
            raise DataError(self._not_found(root, raw, exc)) from exc

        classes = [str(c) for c in official_train.classes]
        full = TensorImages(official_train.data, official_train.targets, classes)
        test = TensorImages(official_test.data, official_test.targets, classes)
        train_idx, (val_idx,) = stratified_split(
            full.targets.numpy(), {"val_size": self.val_size}, self.seed
        )
        splits = DataSplits(full.subset(train_idx), full.subset(val_idx), test)
        check_train_pairs(splits.train, f"{cls_name} in {root!r}")
        return splits

    def _not_found(self, root: str, raw: str, exc: RuntimeError) -> str:
        cls_name = _MNIST_FAMILY[self.name]
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = (
            f"downloading {cls_name} into {root!r} failed ({reason.rstrip(':')})"
            if self.download
            else f"{cls_name} is not in {root!r} and download=false"
        )
        return (
            f"{what}; for an offline run put {', '.join(_IDX_FILES)} "
            f"(or the same names with .gz) in {raw}"
        )


def _gunzip_missing(raw: str) -> None:
    """Decompress ``raw/<name>.gz`` where ``raw/<name>`` is missing (torchvision reads only
    the plain files, and accepts a .gz only with its download checksum)."""
    for name in _IDX_FILES:
        plain = os.path.join(raw, name)
        packed = plain + ".gz"
        if os.path.exists(plain) or not os.path.isfile(packed):
            continue
        partial = plain + ".partial"
        try:
            with gzip.open(packed, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (gzip.BadGzipFile, EOFError) as exc:
            os.remove(partial)
            raise DataError(
                f"{packed!r} is not a complete gzip file ({exc}); replace it with the original"
            ) from None
        os.replace(partial, plain)


def _check_idx_files(raw: str) -> None:
    """Check the header and size of each IDX file present, so a damaged file is named
    instead of failing inside torchvision with a bare assertion."""
    for name, (magic, ndim) in _IDX_FILES.items():
        path = os.path.join(raw, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
        size = os.path.getsize(path)
        found = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
        dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        expected = len(header) + int(np.prod(dims)) if len(header) == 4 + 4 * ndim else -1
        if found != magic or size != expected:
            raise DataError(
                f"{path!r} is not a valid IDX file (magic {found}, {size} bytes; expected "
                f"magic {magic} and a size matching its header); replace it with the "
                "original file"
            )
