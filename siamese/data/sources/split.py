"""Splitting a source: stratified held-out parts of exact size, and the train-split pair check."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from siamese.data.datasets import LabelledImages
from siamese.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def stratified_split(
    labels: np.ndarray, holdout: Mapping[str, int], seed: int, clip: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Split indices into train plus one held-out part per ``holdout`` entry, by class.

    Each part gets exactly its size, shared among classes in proportion to their counts
    (largest remainder, ties broken by the seed), and every class keeps at least one item
    in train. Indices within each part are sorted. ``holdout`` maps a config key (used in
    messages) to a size. A size that cannot be met raises a ConfigError, or with ``clip``
    shrinks to what can be held out, with a warning.

    Returns:
        (train indices, [indices of each held-out part in ``holdout`` order])
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    spare = counts - 1  # each class keeps one item in train
    quotas = []
    for key, size in holdout.items():
        if size > spare.sum() and clip:
            log.warning(
                "data.source.%s: holding out %d items instead of %d, so that every class keeps one "
                "in train",
                key,
                int(spare.sum()),
                size,
            )
            size = int(spare.sum())
        if size > spare.sum():
            raise ConfigError(
                f"data.source.{key} asks for {size} held-out items but only {int(spare.sum())} of "
                f"{labels.size} can be held out while every class keeps one in train; "
                "use a smaller value"
            )
        quota = _apportion(counts, size, spare, rng)
        spare = spare - quota
        quotas.append(quota)

    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts: list[list[np.ndarray]] = [[] for _ in range(len(quotas) + 1)]
    for c in range(counts.size):
        members = rng.permutation(order[starts[c] : starts[c + 1]])
        begin = 0
        for part, quota in enumerate(quotas, start=1):
            parts[part].append(members[begin : begin + quota[c]])
            begin += quota[c]
        parts[0].append(members[begin:])
    merged = [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]
    return merged[0], merged[1:]


def _apportion(
    counts: np.ndarray, size: int, cap: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Share ``size`` among classes in proportion to ``counts``, at most ``cap`` each."""
    ideal = size * counts / counts.sum()
    quota = np.minimum(np.floor(ideal).astype(np.int64), cap)
    rest = size - int(quota.sum())
    # Largest remainder first; the seeded tie-break keeps equal classes from always
    # favouring the first ones.
    order = np.lexsort((rng.random(counts.size), -(ideal - quota)))
    while rest > 0:
        for c in order:
            if quota[c] < cap[c]:
                quota[c] += 1
                rest -= 1
                if rest == 0:
                    break
    return quota


def check_train_pairs(train: LabelledImages, where: str) -> None:
    """Refuse a train split without any positive pair; warn about single-image classes."""
    counts = torch.bincount(train.targets, minlength=len(train.classes))
    if not bool((counts >= 2).any()):
        raise DataError(
            f"no positive pair can exist in the train split of {where}: no class has two "
            f"training images ({len(train)} images in {int((counts > 0).sum())} classes); "
            "add images so that some class has at least two"
        )
    singles = torch.nonzero(counts == 1).reshape(-1)
    if singles.numel():
        log.warning(
            "%d class(es) in the train split of %s have a single image (e.g. %r); they are "
            "kept and serve only as negatives",
            singles.numel(),
            where,
            train.classes[int(singles[0])],
        )
