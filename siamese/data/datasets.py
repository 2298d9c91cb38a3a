"""Labelled image sets: in-memory tensors or image files, fetched a whole batch at a time.

Every source in ``siamese.data.sources`` returns these, so samplers, pair builders and the
data module see one interface: ``targets`` (N,) int64, ``classes``, ``__getitem__`` for one
item and ``__getitems__`` for a batch (used by the DataLoader, so tensor data is sliced in
one indexing operation instead of N Python calls).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from siamese.errors import DataError

log = logging.getLogger(__name__)


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


class TensorImages(LabelledImages):
    """Images held in memory as a uint8 (N, C, H, W) or float (N, C, H, W) tensor in [0, 1]."""

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str]) -> None:
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[0] != targets.numel():
            raise DataError(
                f"{images.shape[0]} images but {targets.numel()} labels; they must match"
            )
        self.images = images.contiguous()
        self.targets = targets.to(torch.int64).reshape(-1)
        self.classes = list(classes)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64).to(self.images.device, non_blocking=True)
        images = self.images[idx]
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).div_(255.0)
        return images, self.targets[idx]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: Sequence[int] | Tensor) -> TensorImages:
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return TensorImages(self.images[idx], self.targets[idx], self.classes)

    def to(self, device: torch.device | str) -> TensorImages:
        """The same set held on ``device`` (batches are then sliced there)."""
        return TensorImages(self.images.to(device), self.targets.to(device), self.classes)

    def resized(self, image_size: tuple[int, int]) -> TensorImages:
        if tuple(image_size) == self.images.shape[2:]:
            return self
        out = []
        for start in range(0, len(self.images), 4096):  # bounded memory for big sets
            chunk = self.images[start : start + 4096].to(torch.float32)
            chunk = F.interpolate(
                chunk, size=tuple(image_size), mode="bilinear", antialias=True, align_corners=False
            )
            out.append(
                chunk.round_().clamp_(0, 255).to(torch.uint8)
                if self.images.dtype == torch.uint8
                else chunk
            )
        return TensorImages(torch.cat(out), self.targets, self.classes)


class FileImages(LabelledImages):
    """Images read from files on demand, converted to ``channels`` and resized to ``image_size``.

    Nothing is opened at construction, so a folder of many files indexes quickly; a file that
    cannot be decoded raises a DataError naming it when it is first read.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Tensor | Sequence[int],
        classes: Sequence[str],
        image_size: tuple[int, int],
        channels: int,
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

    def load(self, path: str) -> Tensor:
        """Read one file as float32 (C, H, W) in [0, 1]."""
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor

        try:
            with Image.open(path) as img:
                img.load()
                img = to_mode(img, "L" if self.channels == 1 else "RGB")
                h, w = self.image_size
                if img.size != (w, h):
                    img = img.resize((w, h), Image.BILINEAR)
                return pil_to_tensor(img).to(torch.float32).div_(255.0)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {path!r}: {exc}") from None

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        images = torch.stack([self.load(self.paths[i]) for i in idx.tolist()])
        return images, self.targets[idx]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size[0], self.image_size[1]

    def resized(self, image_size: tuple[int, int]) -> FileImages:
        return FileImages(self.paths, self.targets, self.classes, image_size, self.channels)

    def subset(self, indices: Sequence[int] | Tensor) -> FileImages:
        idx = torch.as_tensor(indices, dtype=torch.int64).tolist()
        return FileImages(
            [self.paths[i] for i in idx],
            self.targets[idx],
            self.classes,
            self.image_size,
            self.channels,
        )


class WithIndices(Dataset):
    """Batches of ``(images, labels, indices)``: evaluation puts embeddings back in item order,
    so metrics do not depend on the order batches were drawn in."""

    def __init__(self, images: LabelledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        images, labels = self.images.__getitems__(indices)
        return images, labels, torch.as_tensor(indices, dtype=torch.int64)


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

    def resized(self, image_size: tuple[int, int]) -> ConcatImages:
        return ConcatImages([p.resized(image_size) for p in self.parts])


def to_mode(img, mode: str):
    """Convert a PIL image to 'L' or 'RGB', scaling 16-bit and compositing alpha on white."""
    from PIL import Image

    if img.mode == mode:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer images: scale to 8 bits instead of clipping to white.
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32))
        peak = float(arr.max()) or 1.0
        img = Image.fromarray((arr / peak * 255.0).clamp(0, 255).to(torch.uint8).numpy(), "L")
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert(mode)


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


def identity_collate(batch):
    """Collate for ``__getitems__`` datasets: the batch is already stacked."""
    return batch
