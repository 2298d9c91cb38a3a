"""The Lightning data module: a source's splits -> class-balanced or explicit-pair batches.

Training batches are ``(images, labels)`` from class-balanced batches (``pair_mode=in_batch``:
every pair inside the batch is used) or ``(x1, x2, same)`` (``pair_mode=explicit``).
Validation and test batches are always ``(images, labels)`` in a fixed order; the module
embeds them all and scores retrieval and fixed-seed verification pairs at epoch end.
Augmentation runs batch-wise on the device after transfer, in training only. Image files
that cannot be decoded stop the run with their path, or with ``skip_bad_files`` are skipped
and listed in ``bad_files`` (see ``siamese.data.datasets.BadFiles``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader

from siamese.checks import image_size
from siamese.data.datasets import (
    BadFiles,
    DataSplits,
    LabelledImages,
    TensorImages,
    WithIndices,
    finalize_bad_files,
    identity_collate,
)
from siamese.data.pairs import PairBatchSampler, PairView
from siamese.data.samplers import BatchPlan, ClassBalancedBatchSampler, EvalBatchSampler
from siamese.distributed import rank_and_world
from siamese.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PAIR_MODES = ("in_batch", "explicit")
ON_DEVICE = ("auto", True, False)
# on_device=auto moves tensor splits to a GPU when they take less than this share of its
# free memory.
ON_DEVICE_SHARE = 0.25


class ResumableLoader(DataLoader):
    """The training loader: Lightning keeps its position (epoch and batches done) in every
    checkpoint and hands it back on resume, before the first batch is drawn, so a run
    restored from a mid-epoch checkpoint goes on with the batches it had not seen."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.resume(int(state["epoch"]), int(state["completed"]))


class Source(Protocol):
    """Anything that turns a root folder into splits (see ``siamese.data.sources``)."""

    def load(self, root: str | None) -> DataSplits: ...


class SiameseDataModule(pl.LightningDataModule):
    """Batches for Siamese training from any source with ``load(root) -> DataSplits``.

    Args:
        source: a ``siamese.data.sources`` object (MNISTSubset, TorchvisionMNIST, ...).
        root: where the source finds or downloads its files (unused by the embedded subset).
        batch_size: images per training batch (in_batch) or pairs per batch (explicit).
        samples_per_class: images of each class in a class-balanced batch. The batches are
            planned from the training split (``siamese.data.samplers.plan_batches``): a
            batch size that is not a multiple of it, or asks for more classes than the
            split has, is adapted and the plan logged once (docs/batches.md).
        pair_mode: ``in_batch`` (all B(B-1)/2 pairs of a class-balanced batch) or
            ``explicit`` (balanced (x1, x2, same) pairs, redrawn every epoch).
        pairs_per_epoch: explicit pairs per epoch (default: the training set's size).
        eval_batch_size: images per validation/test batch.
        num_workers: DataLoader worker processes (0 is fastest for in-memory tensors).
        image_size: deliver every split at this size (an int or [H, W]); None keeps the
            source's own size. Tensor data is resized once, files as they are read.
        augment: a batch-wise module applied to training images, or None.
        seed: seeds the batch order (epoch ``e`` uses ``seed + e``).
        reshuffle: draw new training batches every epoch; False repeats the first epoch's
            batches (``debug=overfit``: ``trainer.overfit_batches=1`` then sees one batch).
        on_device: keep in-memory (tensor) splits on the training GPU, so batches are sliced
            there and nothing crosses the bus per step: ``auto`` does it when the trainer
            runs on a GPU and the splits take under a quarter of its free memory, ``true``
            whatever their size, ``false`` never. Files are always read on the CPU.
        skip_bad_files: what to do with an image file that cannot be decoded (damaged,
            empty, not an image, past PIL's decompression-bomb limit): False stops the run
            at the first one with its path; True skips it. A training batch then takes
            another image of the same class in its place; evaluation leaves it out.
        bad_files: where skipped files are listed, one ``<path>\\t<reason>`` line each,
            sorted and each once at the end of every stage (normally the run directory's
            ``bad_files.txt``); None lists them only as warnings.

    Under DDP ``batch_size`` and ``eval_batch_size`` are per process: each process draws its
    contiguous part of the same global class-balanced batch (a class may be split between
    processes), and evaluation splits its batches between processes (the module gathers the
    embeddings and labels back).
    """

    def __init__(
        self,
        source: Source,
        root: str | None = None,
        batch_size: int = 128,
        samples_per_class: int = 16,
        pair_mode: str = "in_batch",
        pairs_per_epoch: int | None = None,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool = False,
        image_size: int | Sequence[int] | None = None,
        augment: nn.Module | None = None,
        seed: int = 0,
        reshuffle: bool = True,
        on_device: bool | str = "auto",
        skip_bad_files: bool = False,
        bad_files: str | None = None,
    ) -> None:
        super().__init__()
        if pair_mode not in PAIR_MODES:
            raise ConfigError(
                f"data.pair_mode={pair_mode!r} is unknown; expected one of {PAIR_MODES}"
            )
        if batch_size < 2:
            raise ConfigError(f"data.batch_size must be at least 2, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        if on_device not in ON_DEVICE:
            raise ConfigError(
                f"data.on_device={on_device!r} is unknown; expected auto, true or false"
            )
        if not isinstance(skip_bad_files, bool):
            raise ConfigError(f"data.skip_bad_files must be true or false, got {skip_bad_files!r}")
        self.source = source
        try:
            self.root = str(Path(root).expanduser().resolve()) if root else None
        except (OSError, RuntimeError) as exc:  # Python 3.11 raises RuntimeError on a loop
            raise DataError(
                f"data.root {str(root)!r} cannot be resolved: a symbolic link loop ({exc}); "
                "pass data.root=PATH to the real data folder"
            ) from None
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.pair_mode = pair_mode
        self.pairs_per_epoch = pairs_per_epoch
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.image_size = image_size_pair(image_size)
        self.augment = augment
        self.seed = seed
        self.reshuffle = reshuffle
        self.on_device = on_device
        self.skip_bad_files = skip_bad_files
        self.bad_files = str(bad_files) if bad_files else None
        # Shared by every split (and copied into each worker process).
        self.bad_file_policy = BadFiles(skip_bad_files, self.bad_files)
        self._bad_files_reported = 0
        self._plan_logged = False  # the batch plan's line is logged once per run
        self.splits: DataSplits | None = None
        self._read: DataSplits | None = None
        # What the loaders read: ``splits``, or copies of them on the training device.
        self._loader_splits: DataSplits | None = None
        self._loader_splits_device: torch.device | None = None

    # -- data ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        # Called on one process only: downloads happen here, not once per rank.
        self.load_splits()

    def setup(self, stage: str | None = None) -> None:
        splits = self.load_splits()
        if stage in (None, "fit"):
            self.check_batches()  # fail at start, not at the first batch
        device = self._device()
        if self._loader_splits is None or self._loader_splits_device != device:
            self._loader_splits = splits
            self._loader_splits_device = device
            if device.type != "cpu" and self._wants_device(splits, device):
                self._loader_splits = DataSplits(
                    *(s.to(device) for s in splits.as_tuple())  # type: ignore[attr-defined]
                )
                log.info(
                    "data: the splits are held on %s (data.on_device=%s)", device, self.on_device
                )

    def _device(self) -> torch.device:
        trainer = self.trainer
        if trainer is None:
            return torch.device("cpu")
        return trainer.strategy.root_device

    def _wants_device(self, splits: DataSplits, device: torch.device) -> bool:
        """Whether the loaders should read copies of ``splits`` held on ``device``."""
        if self.on_device is False:
            return False
        in_memory = all(isinstance(s, TensorImages) for s in splits.as_tuple())
        if not in_memory:
            if self.on_device is True:
                raise ConfigError(
                    "data.on_device=true needs in-memory (tensor) data, but this source reads "
                    "image files per batch; use data.on_device=auto or false"
                )
            return False
        if self.on_device is True:
            return True
        size = sum(s.images.numel() * s.images.element_size() for s in splits.as_tuple())
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if size > ON_DEVICE_SHARE * free:
                log.info(
                    "data: the splits (%.1f GiB) stay on the CPU: more than a quarter of the "
                    "GPU's free memory (data.on_device=true forces them onto it)",
                    size / 2**30,
                )
                return False
        return True

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return rank_and_world()

    def read_splits(self) -> DataSplits:
        """The source's splits at ``image_size``, unchecked (evaluation checks its own)."""
        if self._read is None:
            splits = self.source.load(self.root)
            splits = DataSplits(
                *(s.with_bad_files(self.bad_file_policy) for s in splits.as_tuple())
            )
            if self.image_size is not None:
                splits = DataSplits(*(s.resized(self.image_size) for s in splits.as_tuple()))
            self._read = splits
        return self._read

    def load_splits(self) -> DataSplits:
        """The splits, checked for training: each has a class with two images."""
        if self.splits is None:
            splits = self.read_splits()
            check_classes(splits, self.root)
            for name in ("train", "val", "test"):
                check_split(getattr(splits, name), name, self.root)
            self.splits = splits
        return self.splits

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images; the tower is built for it."""
        return self.load_splits().image_shape

    def input_stats(self, max_items: int = 4096) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of (up to ``max_items`` evenly spaced) training images.

        Files are decoded by ``num_workers`` processes; unreadable ones are refused or left
        out as ``skip_bad_files`` says.
        """
        train = self.load_splits().train
        step = max(1, len(train) // max_items)
        indices = list(range(0, len(train), step))
        if isinstance(train, TensorImages) or self.num_workers == 0:
            images = train.read(indices)[0]
        else:
            loader = ordered_loader(train.subset(indices), 256, self.num_workers)
            images = torch.cat([batch[0] for batch in loader])
        if len(images) == 0:
            listed = f" (listed in {self.bad_files})" if self.bad_files else ""
            raise DataError(
                f"none of the {len(indices)} training images read for the input statistics "
                f"could be decoded{listed}; check the files in data.root={self.root!r}"
            )
        mean = images.mean(dim=(0, 2, 3))
        std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]

    # -- loaders ---------------------------------------------------------------------------
    def check_batches(self, world_size: int | None = None) -> BatchPlan | None:
        """Plan the training batches for ``world_size`` processes (by default the trainer's),
        or fail when none can be drawn; train.py runs it before the trainer starts any.

        The first time, rank 0 logs the plan's line when it differs from what was asked
        (``docs/batches.md``). Returns the plan (None for explicit pairs).
        """
        if self.pair_mode != "in_batch":
            return None
        world = self._rank_and_world()[1] if world_size is None else world_size
        plan = self._train_batch_sampler(rank=0, world_size=world).plan
        if plan.adapted and not self._plan_logged and rank_zero_only.rank == 0:
            log.info(plan.describe())
        self._plan_logged = True
        return plan

    def train_batches_per_epoch(self) -> int:
        """Training batches per epoch on this process (before trainer.limit_train_batches)."""
        return len(self._train_batch_sampler())

    def _train_batch_sampler(self, rank: int | None = None, world_size: int | None = None):
        train = self.load_splits().train
        if rank is None or world_size is None:
            rank, world_size = self._rank_and_world()
        if self.pair_mode == "in_batch":
            return ClassBalancedBatchSampler(
                train.targets,
                self.batch_size,
                self.samples_per_class,
                self.seed,
                self.reshuffle,
                rank=rank,
                world_size=world_size,
            )
        return PairBatchSampler(
            train.targets,
            self.batch_size,
            self.pairs_per_epoch or len(train),
            self.seed,
            self.reshuffle,
            rank=rank,
            world_size=world_size,
        )

    def _loader(self, dataset, batch_sampler, kind: type = DataLoader) -> DataLoader:
        # Splits held on a GPU are sliced in this process: no workers, nothing to pin.
        on_gpu = self._loader_splits is not None and self._loader_splits is not self.splits
        workers = 0 if on_gpu else self.num_workers
        return kind(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=identity_collate,
            num_workers=workers,
            pin_memory=self.pin_memory and not on_gpu,
            persistent_workers=workers > 0,
            # Its own generator for the workers' base seed: creating an iterator then draws
            # nothing from the global stream (which augmentation uses), so a resumed run's
            # random numbers line up with an uninterrupted one's.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _splits_for_loaders(self) -> DataSplits:
        return self._loader_splits or self.load_splits()

    def train_dataloader(self) -> DataLoader:
        train = self._splits_for_loaders().train
        dataset = train if self.pair_mode == "in_batch" else PairView(train)
        return self._loader(dataset, self._train_batch_sampler(), ResumableLoader)

    def _eval_loader(self, split: LabelledImages) -> DataLoader:
        # Batches mix classes (for the val loss); items carry their index for the metrics.
        rank, world = self._rank_and_world()
        sampler = EvalBatchSampler(len(split), self.eval_batch_size, self.seed, rank, world)
        return self._loader(WithIndices(split), sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._splits_for_loaders().val)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._splits_for_loaders().test)

    def teardown(self, stage: str | None = None) -> None:
        # Worker processes append skipped files as they meet them: sort the list and keep
        # each file once, after every stage.
        if not (self.skip_bad_files and self.bad_files):
            return
        listed = finalize_bad_files(self.bad_files)
        if len(listed) != self._bad_files_reported and self._rank_and_world()[0] == 0:
            log.warning(
                "%d unreadable image file(s) were skipped (data.skip_bad_files=true); "
                "they are listed in %s",
                len(listed),
                self.bad_files,
            )
        self._bad_files_reported = len(listed)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment is None or self.trainer is None or not self.trainer.training:
            return batch
        if isinstance(batch, Tensor):  # the model summary's example input, not a batch
            return batch
        if len(batch) == 3:  # (x1, x2, same)
            x1, x2, same = batch
            return self.augment(x1), self.augment(x2), same
        images, labels = batch
        return self.augment(images), labels


def ordered_loader(split: LabelledImages, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches ``(images, labels, items)`` of ``split`` in item order, for evaluation.

    ``items`` are the split indices of the rows: an unreadable file skipped under
    ``skip_bad_files`` is left out, so concatenating ``items`` over the batches tells which
    items were embedded. An unreadable file that is not skipped raises a one-line
    ImageReadError, also from worker processes.
    """
    batches = [
        list(range(s, min(s + batch_size, len(split)))) for s in range(0, len(split), batch_size)
    ]
    return DataLoader(
        WithIndices(split),
        batch_sampler=batches,
        collate_fn=identity_collate,
        num_workers=num_workers,
    )


def image_size_pair(
    value: int | Sequence[int] | None, key: str = "data.image_size"
) -> tuple[int, int] | None:
    """``32`` or ``[H, W]`` as (H, W) (None stays None), or one line for anything else."""
    return None if value is None else image_size(key, value)


def check_classes(splits: DataSplits, root: str | None) -> None:
    """Refuse data with fewer than two classes in all: no different pair can exist, and no
    batch size or split setting could change that (so say so before naming those)."""
    labels = torch.cat([s.targets.reshape(-1) for s in splits.as_tuple() if len(s)])
    found = int(torch.unique(labels).numel()) if len(labels) else 0
    in_train = int(torch.unique(splits.train.targets).numel()) if len(splits.train) else 0
    where = f"data.root={root!r}" if root else "the data"
    if found < 2:
        raise DataError(
            f"{where} holds {found} class{'es' if found != 1 else ''}; pairs need at least 2 "
            "(a different-class pair for each same-class one): add a sub-folder of images "
            "for each class"
        )
    if in_train == 1:
        raise DataError(
            f"the train split of {where} holds 1 class; training pairs need at least 2: add "
            "classes, or hold out fewer for validation and test"
        )


def check_split(split: LabelledImages, name: str, root: str | None) -> None:
    """Refuse a split in which no same pair can exist (the source warns about lonely classes)."""
    where = f" of data.root={root!r}" if root else ""
    if len(split) == 0:
        raise DataError(f"the {name} split{where} is empty; add images or change the split sizes")
    _, counts = torch.unique(split.targets, return_counts=True)
    if not bool((counts >= 2).any()):
        raise DataError(
            f"no class in the {name} split{where} has two images, so no same pair can exist; "
            f"add images (every class needs 2+ for training, val and test) or change the "
            f"split fractions"
        )
