"""Embedding image files in batches: decoded by DataLoader workers, embedded batch by batch.

A file that cannot be decoded is skipped and reported (path, reason), as training does with
``data.skip_bad_files=true``; the others are embedded in their order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from siamese.checks import check_int_setting
from siamese.data.datasets import UndecodableImage, decode_image
from siamese.module import SiameseModule


class _Files(Dataset):
    """Image files decoded as the model takes them; an unreadable one yields its reason."""

    def __init__(self, files: Sequence[str], shape: tuple[int, int, int]) -> None:
        self.files = list(files)
        self.shape = shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        channels, height, width = self.shape
        try:
            return i, decode_image(self.files[i], (height, width), channels), ""
        except UndecodableImage as exc:
            return i, None, exc.reason


def _collate(
    rows: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in rows if x is not None]
    bad = [(i, reason) for i, x, reason in rows if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def embed_files(
    model: SiameseModule,
    files: Sequence[str],
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Embeddings of the readable ``files``: (M, D) float32 rows, the positions in ``files``
    they belong to (in order), and (position, reason) of each file that could not be read."""
    check_int_setting("batch_size", batch_size)
    check_int_setting("num_workers", num_workers, 0)
    loader = DataLoader(
        _Files(files, model.tower.input_shape),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    rows: list[np.ndarray] = []
    kept: list[int] = []
    bad: list[tuple[int, str]] = []
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="embedding", unit="batch", leave=False, dynamic_ncols=True)
    for positions, images, failed in batches:
        bad.extend(failed)
        if images is not None:
            rows.append(embed_tensor(model, images, batch_size))
            kept.extend(positions)
    dim = model.tower.embedding_dim
    emb = np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)
    return emb, kept, bad


def embed_tensor(model: SiameseModule, images: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """``model.embed(images)`` as a float32 numpy array (N, D)."""
    return model.embed(images, batch_size=batch_size).float().cpu().numpy()
