"""Pair construction: labelled images -> balanced (i, j, same) pairs and (x1, x2, same) batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from siamese.data.datasets import LabelledImages
from siamese.data.samplers import EpochBatchSampler, check_rank
from siamese.errors import DataError

# Up to this many items, pairs are drawn without replacement from the full list of pairs.
_ENUMERATE_UP_TO = 2048


class Pairs(NamedTuple):
    first: Tensor  # (P,) int64 indices
    second: Tensor  # (P,) int64 indices
    same: Tensor  # (P,) bool


def sample_pairs(labels: Tensor, num_pairs: int, seed: int = 0) -> Pairs:
    """``num_pairs`` pairs of distinct items, half same-class and half different-class.

    Deterministic for a given ``labels`` and ``seed``. For small sets (<= 2048 items) pairs
    are distinct (drawn from the enumerated list); above, they are drawn with replacement.
    When a small set has fewer pairs of one kind than asked, every pair of that kind is
    used and as many of the other, so the pairs stay balanced (and fewer); a set with no
    pair of one kind (one class, or only singletons) gives only the other kind's half.
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    if n < 2:
        raise DataError(f"need at least 2 items to form pairs, got {n}")
    half = num_pairs // 2
    if n <= _ENUMERATE_UP_TO:
        rows, cols = torch.triu_indices(n, n, offset=1)
        same = labels[rows] == labels[cols]
        n_same, n_diff = int(same.sum()), len(same) - int(same.sum())
        counts = (min(num_pairs - half, n_same), min(half, n_diff))
        if counts != (num_pairs - half, half) and n_same and n_diff:
            counts = (min(counts),) * 2  # one kind runs short: as many of the other
        picked = []
        for kind, count in zip((same, ~same), counts, strict=True):
            where = kind.nonzero().squeeze(1)
            picked.append(where[torch.randperm(len(where), generator=g)[:count]])
        idx = torch.cat(picked)
        idx = idx[torch.randperm(len(idx), generator=g)]
        return Pairs(rows[idx], cols[idx], same[idx])
    return _sample_with_replacement(labels, num_pairs - half, half, g)


def _sample_with_replacement(labels: Tensor, n_same: int, n_diff: int, g: torch.Generator) -> Pairs:
    n = len(labels)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    # Same pairs: an anchor from a class with >= 2 items, then another member of its class.
    eligible = (counts[inverse] >= 2).nonzero().squeeze(1)
    if len(eligible) == 0:
        n_same = 0
    a = eligible[torch.randint(len(eligible), (n_same,), generator=g)] if n_same else eligible[:0]
    c = inverse[a]
    # Pick among the class's other members: offset in [0, count-1), skipping the anchor.
    rank_of_a = torch.empty(n, dtype=torch.int64)
    rank_of_a[order] = torch.arange(n) - starts[inverse[order]]
    off = (torch.rand(n_same, generator=g) * (counts[c] - 1)).long()
    off = off + (off >= rank_of_a[a]).long()
    b = order[starts[c] + off]
    # Different pairs: rejection-sample partners from other classes.
    if len(classes) < 2:
        n_diff = 0
    x = torch.randint(n, (n_diff,), generator=g)
    y = torch.randint(n, (n_diff,), generator=g)
    bad = labels[x] == labels[y]
    while bad.any():
        y[bad] = torch.randint(n, (int(bad.sum()),), generator=g)
        bad = labels[x] == labels[y]
    first, second = torch.cat([a, x]), torch.cat([b, y])
    same = torch.cat([torch.ones(len(a), dtype=torch.bool), torch.zeros(len(x), dtype=torch.bool)])
    perm = torch.randperm(len(first), generator=g)
    return Pairs(first[perm], second[perm], same[perm])


class PairBatchSampler(EpochBatchSampler):
    """Explicit balanced pairs, redrawn each epoch from ``seed + epoch``, ``batch_size`` a batch.

    ``reshuffle=False`` ignores ``set_epoch``: every epoch repeats epoch 0's pairs. Under DDP
    (``world_size`` > 1) ``batch_size`` is per process: the epoch's pairs are rounded up to
    whole global batches of ``batch_size * world_size`` and process ``rank`` takes its part of
    each, so every process runs the same number of equal batches and no pair is repeated.
    """

    def __init__(
        self,
        targets: Tensor,
        batch_size: int,
        num_pairs: int,
        seed: int = 0,
        reshuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_rank(rank, world_size)
        self.targets = torch.as_tensor(targets).reshape(-1)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        global_batch = batch_size * world_size
        if world_size > 1:  # equal batches on every process
            num_pairs = -(-num_pairs // global_batch) * global_batch
        self.num_pairs = num_pairs
        self._init_epochs(seed, reshuffle)

    def __len__(self) -> int:
        return -(-self.num_pairs // (self.batch_size * self.world_size))

    def _batches(self) -> Iterator[list[tuple[int, int, bool]]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        half = self.num_pairs // 2
        pairs = _sample_with_replacement(self.targets, self.num_pairs - half, half, g)
        rows = list(
            zip(pairs.first.tolist(), pairs.second.tolist(), pairs.same.tolist(), strict=True)
        )
        step = self.batch_size * self.world_size
        for start in range(0, len(rows), step):
            offset = start + self.rank * self.batch_size
            yield rows[offset : offset + self.batch_size]


class PairView(Dataset):
    """A LabelledImages seen through (i, j, same) triples: batches of (x1, x2, same)."""

    def __init__(self, images: LabelledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, triples: Sequence[tuple[int, int, bool]]) -> tuple[Tensor, ...]:
        first, second, _ = zip(*triples, strict=True)
        # Both sides in one read, and "same" from the labels where the images are (the
        # triples' flags say the same): on a GPU only the index list crosses the bus.
        images, labels = self.images.__getitems__([*first, *second])
        x1, x2 = images.split(len(first))
        y1, y2 = labels.split(len(first))
        return x1, x2, y1 == y2
