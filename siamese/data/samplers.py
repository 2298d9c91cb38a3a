"""Batch samplers: class-balanced batches for in-batch pairs, fixed batches for evaluation.

Samplers yield lists of indices that the DataLoader hands to ``__getitems__`` in one call.
They draw from their own generator seeded by ``seed + epoch`` (``SiameseModule`` calls
``set_epoch`` at each epoch start, as Lightning only reaches a loader's sampler), so an
epoch's batches are reproducible and a resumed run sees the same ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

from siamese.errors import ConfigError

log = logging.getLogger(__name__)


def check_rank(rank: int, world_size: int) -> None:
    """A sampler's share must be one of the processes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")


class EpochBatchSampler(Sampler):
    """A batch sampler that redraws its batches each epoch and can resume mid-epoch.

    ``set_epoch(e)`` picks epoch ``e``'s batches (epoch 0's when ``reshuffle`` is off);
    ``completed`` counts the batches of the current epoch that training has finished (the
    module sets it); ``resume(epoch, completed)`` makes the next iteration skip those, so a
    run restored from a mid-epoch checkpoint sees exactly the batches it had not seen yet.
    The skipped batches are still drawn, so the random stream stays the same.
    """

    def _init_epochs(self, seed: int, reshuffle: bool) -> None:
        self.seed = seed
        self.reshuffle = reshuffle
        self.epoch = 0
        self._requested = 0  # the epoch asked for, before reshuffle=False maps it to 0
        self.skip = 0
        self.completed = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._requested:
            self.skip = 0
        self._requested = epoch
        self.epoch = epoch if self.reshuffle else 0

    def resume(self, epoch: int, completed: int) -> None:
        """Continue epoch ``epoch`` after its first ``completed`` batches (a finished epoch
        goes on with the next one)."""
        if completed >= len(self):
            epoch, completed = epoch + 1, 0
        self.set_epoch(epoch)
        self.skip = self.completed = completed

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._requested, "completed": self.completed}

    def _batches(self) -> Iterator[list]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self._batches()):
            if i >= skip:
                yield batch


class ClassBalancedBatchSampler(EpochBatchSampler):
    """Batches of ``batch_size // samples_per_class`` classes x ``samples_per_class`` images.

    Classes are visited in shuffled rounds, each as often as any other whatever its size
    (as pytorch-metric-learning's ``MPerClassSampler``); each class keeps a shuffled queue
    that is refilled when empty. With classes of equal size every image is used about once
    per epoch; with unequal ones a small class's images recur within an epoch and a large
    class's are not all seen. A class with fewer images than ``samples_per_class`` is
    sampled with replacement: without augmentation a batch can then hold the same image
    twice (a zero-distance positive pair). One epoch has ``len(targets) // batch_size``
    batches. ``reshuffle=False``
    ignores ``set_epoch``: every epoch repeats epoch 0's batches (``debug=overfit``).

    Under DDP (``world_size`` > 1) ``batch_size`` is per process: the sampler draws the
    global batches of ``batch_size * world_size`` images that one process would draw with
    that batch size, and process ``rank`` takes its ``rank``-th part, whole classes each. The
    parts of all processes make up the global batch, so the model gathers them to pair every
    image with every other (``siamese.distributed.gather_with_grad``).
    """

    def __init__(
        self,
        targets: Tensor,
        batch_size: int,
        samples_per_class: int,
        seed: int = 0,
        reshuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        targets = torch.as_tensor(targets).reshape(-1)
        if samples_per_class < 2:
            raise ConfigError(
                f"data.samples_per_class={samples_per_class} gives no positive pairs in a "
                "batch; use 2 or more"
            )
        check_rank(rank, world_size)
        global_batch = batch_size * world_size
        if world_size > 1 and (batch_size % samples_per_class or batch_size < samples_per_class):
            raise ConfigError(
                f"data.batch_size={batch_size} per process cannot be split into class-balanced "
                f"parts of data.samples_per_class={samples_per_class} across {world_size} "
                f"processes: each process needs whole classes, so use a multiple of "
                f"{samples_per_class} (e.g. data.batch_size="
                f"{max(samples_per_class, batch_size // samples_per_class * samples_per_class)})"
            )
        if global_batch % samples_per_class or global_batch // samples_per_class < 2:
            raise ConfigError(
                f"data.batch_size={batch_size} does not fit class-balanced batches of "
                f"data.samples_per_class={samples_per_class}: it must be a multiple of it and "
                f"hold at least 2 classes (batch_size >= {2 * samples_per_class})"
            )
        classes, counts = torch.unique(targets, return_counts=True)
        self.classes_per_batch = global_batch // samples_per_class
        if self.classes_per_batch > len(classes):
            if world_size > 1:
                fit = len(classes) // world_size * samples_per_class
                raise ConfigError(
                    f"data.batch_size={batch_size} on each of {world_size} processes makes "
                    f"global batches of {global_batch} images = {self.classes_per_batch} "
                    f"classes x data.samples_per_class={samples_per_class}, but the training "
                    f"split has only {len(classes)} classes; raise data.samples_per_class to "
                    f"at least {-(-global_batch // len(classes))} (batch_size must stay a "
                    f"multiple of it) or lower data.batch_size"
                    + (f" to {fit}" if fit >= samples_per_class else "")
                )
            raise ConfigError(
                f"data.batch_size={batch_size} / data.samples_per_class={samples_per_class} = "
                f"{self.classes_per_batch} classes per batch, but the training split has only "
                f"{len(classes)} classes; raise samples_per_class to at least "
                f"{-(-batch_size // len(classes))} or lower batch_size"
            )
        order = torch.argsort(targets, stable=True)
        self.members = list(torch.split(order, counts.tolist()))  # indices of each class
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.rank = rank
        self.world_size = world_size
        self.num_batches = max(1, len(targets) // global_batch)
        self._init_epochs(seed, reshuffle)

    def __len__(self) -> int:
        return self.num_batches

    def _batches(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        m = self.samples_per_class
        part = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        queues = [members[torch.randperm(len(members), generator=g)] for members in self.members]
        heads = [0] * len(queues)
        class_order: list[int] = []
        for _ in range(self.num_batches):
            chosen: list[int] = []
            while len(chosen) < self.classes_per_batch:
                if not class_order:
                    class_order = torch.randperm(len(queues), generator=g).tolist()
                c = class_order.pop()
                if c not in chosen:
                    chosen.append(c)
            batch: list[Tensor] = []
            for c in chosen:
                queue = queues[c]
                if len(queue) < m:
                    batch.append(queue[torch.randint(len(queue), (m,), generator=g)])
                    continue
                if heads[c] + m > len(queue):
                    queues[c] = queue = queue[torch.randperm(len(queue), generator=g)]
                    heads[c] = 0
                batch.append(queue[heads[c] : heads[c] + m])
                heads[c] += m
            yield torch.cat(batch)[part].tolist()


class EvalBatchSampler(Sampler[list[int]]):
    """All items once, in a fixed seeded order (so each batch mixes classes), at most
    ``batch_size`` a batch, sizes balanced; the same on every call, so evaluation never
    depends on the epoch.

    Under DDP process ``rank`` of ``world_size`` takes a contiguous share of the batches;
    every process gets the same number of batches and no item is repeated, so gathering all
    processes' embeddings (``siamese.distributed.gather_uneven``) gives the whole split once.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"eval batch size must be >= 1, got {batch_size}")
        check_rank(rank, world_size)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
        per_process = max(1, -(-num_items // (batch_size * world_size)))
        chunks = torch.tensor_split(order, per_process * world_size)
        self.batches = chunks[rank * per_process : (rank + 1) * per_process]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch.tolist()
