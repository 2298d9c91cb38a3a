"""Batch samplers: class-balanced batches for in-batch pairs, fixed batches for evaluation.

Samplers yield lists of indices that the DataLoader hands to ``__getitems__`` in one call.
They draw from their own generator seeded by ``seed + epoch`` (``SiameseModule`` calls
``set_epoch`` at each epoch start, as Lightning only reaches a loader's sampler), so an
epoch's batches are reproducible and a resumed run sees the same ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Sampler

from siamese.errors import ConfigError, DataError

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


@dataclass(frozen=True)
class BatchPlan:
    """What a class-balanced global batch holds: ``slots[i]`` images of its i-th class.

    ``plan_batches`` makes it from what was asked (``batch_size`` per process on
    ``world_size`` processes, ``samples_per_class``) and the number of classes in the
    training split; ``describe()`` is the one line logged when it differs from what was
    asked (``docs/batches.md``).
    """

    batch_size: int  # asked, per process
    samples_per_class: int  # asked
    world_size: int
    num_classes: int  # in the training split
    slots: tuple[int, ...]  # images per class in a global batch, largest first

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def classes_per_batch(self) -> int:
        return len(self.slots)

    @property
    def adapted(self) -> bool:
        """Whether the batches differ from ``samples_per_class`` images of whole classes."""
        return bool(self.reasons())

    def reasons(self) -> list[str]:
        """Why the slots differ from ``samples_per_class`` images of whole classes (empty
        when they do not)."""
        m, g, c = self.samples_per_class, self.global_batch, self.num_classes
        batch = f"data.batch_size={self.batch_size}"
        if self.world_size > 1:
            batch = f"the global batch of {self.world_size} x {self.batch_size} = {g}"
        out = []
        if m < 2:
            out.append(f"data.samples_per_class={m} gives no same pairs; 2 are used")
        m = max(m, 2)
        if g < 4:
            out.append(f"{batch} has room for one class only: no different-class pairs")
        elif g < 2 * m:
            out.append(f"{batch} is less than 2 x data.samples_per_class={m}: 2 classes share it")
        elif g // m > c:
            asked = f"{self.world_size} x {self.batch_size}" if self.world_size > 1 else f"{g}"
            out.append(f"asked {asked} / {m} = {g // m} classes; the training split has {c}")
        elif g % m:
            out.append(f"{batch} is not a multiple of data.samples_per_class={m}")
        return out

    def describe(self) -> str:
        """One line: the batches actually drawn and why they differ from what was asked."""
        g, slots = self.global_batch, self.slots
        head = f"{g} images"
        if self.world_size > 1:
            head = (
                f"global batches of {g} images on {self.world_size} processes "
                f"({self.batch_size} each)"
            )
        if len(set(slots)) == 1:
            body = f"{len(slots)} class{'es' if len(slots) > 1 else ''} x {slots[0]} images"
            body = body if self.world_size == 1 else f"{head} = {body}"
        elif len(slots) <= 4:
            body = f"{head} = {' + '.join(map(str, slots))} of {len(slots)} classes"
        else:
            sizes = sorted(set(slots), reverse=True)
            parts = " + ".join(f"{slots.count(s)} classes x {s}" for s in sizes)
            body = f"{head} = {parts} images"
        reasons = self.reasons()
        return f"batches: {body}" + (f" ({'; '.join(reasons)})" if reasons else "")


def plan_batches(
    num_classes: int, batch_size: int, samples_per_class: int, world_size: int = 1
) -> BatchPlan:
    """The slots of a global batch of ``batch_size * world_size`` images (docs/batches.md).

    Slots of ``m = max(samples_per_class, 2)`` images; a remainder of 2 or more is one
    smaller slot, a remainder of 1 joins the last slot (40 = 16 + 16 + 8, 33 = 17 + 16). A
    batch of 4 or more images holds at least 2 classes: below two slots it is split in two
    (7 = 4 + 3); a batch of 2 or 3 images is one class. More slots than classes: every class,
    the images spread evenly over them (64 on 10 classes = 4 x 7 + 6 x 6).
    """
    g = batch_size * world_size
    if g < 2:
        raise ConfigError(
            f"data.batch_size={batch_size} gives global batches of {g} images; in-batch "
            "pairs need at least 2: use data.batch_size=2 or more"
        )
    m = max(samples_per_class, 2)
    full, rest = divmod(g, m)
    if g < 4:
        slots = [g]
    elif full + (rest >= 2) < 2:  # fewer than two classes of m: two classes share it
        slots = [g - g // 2, g // 2]
    else:
        slots = [m] * full + ([rest] if rest >= 2 else [])
        slots[-1] += rest if rest == 1 else 0
    if len(slots) > num_classes:  # every class, with more images each
        slots = [g // num_classes + (i < g % num_classes) for i in range(num_classes)]
    slots.sort(reverse=True)
    return BatchPlan(batch_size, samples_per_class, world_size, num_classes, tuple(slots))


class ClassBalancedBatchSampler(EpochBatchSampler):
    """Class-balanced batches, planned from the training split (``plan_batches``).

    A global batch holds ``plan.classes_per_batch`` classes with ``plan.slots`` images each:
    usually ``batch_size // samples_per_class`` classes x ``samples_per_class`` images, and
    otherwise what ``plan_batches`` makes of it (every class when the batch asks for more
    classes than the split has; a smaller slot for the remainder). Classes are visited in
    shuffled rounds, each as often as any other whatever its size (as
    pytorch-metric-learning's ``MPerClassSampler``); within a batch the larger slots go to
    the chosen classes with more images. Each class keeps a shuffled queue that is refilled
    when empty, and a slot takes consecutive images of it, so no image appears twice in a
    global batch unless its class has fewer images than its slot: such a class is sampled
    with replacement, its images repeated as evenly as possible (without augmentation a
    batch then holds zero-distance positive pairs). With classes of equal size every image
    is used about once per epoch; with unequal ones a small class's images recur within an
    epoch and a large class's are not all seen. One epoch has
    ``len(targets) // (batch_size * world_size)`` batches (at least 1). ``reshuffle=False``
    ignores ``set_epoch``: every epoch repeats epoch 0's batches (``debug=overfit``).

    Under DDP (``world_size`` > 1) ``batch_size`` is per process: every process draws the
    same global batches of ``batch_size * world_size`` images and process ``rank`` takes its
    ``rank``-th contiguous part of ``batch_size`` images, so a class may be split between
    processes. The model gathers the embeddings and labels of all parts to pair every image
    with every other (``siamese.distributed.gather_with_grad``).

    Raises:
        DataError: fewer than 2 classes of the split have 2 or more images.
        ConfigError: a global batch of fewer than 2 images.
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
        check_rank(rank, world_size)
        classes, counts = torch.unique(targets, return_counts=True)
        pairable = int((counts >= 2).sum())
        if pairable < 2:
            raise DataError(
                f"the training split has {pairable} class{'es' if pairable != 1 else ''} with "
                f"2 or more images ({len(classes)} classes in all); class-balanced batches need "
                "2 such classes for same and different pairs: add images to more classes, or "
                "hold out fewer for validation and test"
            )
        self.plan = plan_batches(len(classes), batch_size, samples_per_class, world_size)
        order = torch.argsort(targets, stable=True)
        self.members = list(torch.split(order, counts.tolist()))  # indices of each class
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.classes_per_batch = self.plan.classes_per_batch
        self.rank = rank
        self.world_size = world_size
        self.num_batches = max(1, len(targets) // self.plan.global_batch)
        self._init_epochs(seed, reshuffle)

    def __len__(self) -> int:
        return self.num_batches

    def _batches(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        slots = self.plan.slots
        part = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        queues = [members[torch.randperm(len(members), generator=g)] for members in self.members]
        heads = [0] * len(queues)
        class_order: list[int] = []
        for _ in range(self.num_batches):
            chosen: list[int] = []
            while len(chosen) < len(slots):
                if not class_order:
                    class_order = torch.randperm(len(queues), generator=g).tolist()
                c = class_order.pop()
                if c not in chosen:
                    chosen.append(c)
            # The largest slots to the classes with the most images (ties: drawn first).
            by_size = sorted(chosen, key=lambda c: -len(queues[c]))
            size = dict(zip(by_size, slots, strict=True))
            batch: list[Tensor] = []
            for c in chosen:
                queue, n = queues[c], size[c]
                if len(queue) < n:  # with replacement: each image n // len or one more times
                    rounds = -(-n // len(queue))
                    draws = [queue[torch.randperm(len(queue), generator=g)] for _ in range(rounds)]
                    batch.append(torch.cat(draws)[:n])
                    continue
                if heads[c] + n > len(queue):
                    queues[c] = queue = queue[torch.randperm(len(queue), generator=g)]
                    heads[c] = 0
                batch.append(queue[heads[c] : heads[c] + n])
                heads[c] += n
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
