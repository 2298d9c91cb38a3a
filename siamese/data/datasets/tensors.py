"""Labelled images held in memory as one tensor, sliced a whole batch at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from siamese.data.datasets.base import LabelledImages
from siamese.errors import DataError


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
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self.images.is_cuda:
            # From pinned memory the copy is queued behind the GPU's work; from pageable
            # memory the driver may wait for that work first (a sync every batch).
            idx = idx.pin_memory()
        idx = idx.to(self.images.device, non_blocking=True)
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
