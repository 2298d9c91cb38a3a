"""Batch plans: class-balanced batches adapt to the training split (docs/batches.md).

The plan tests are exact and instant; the runs (``-m slow``) check that settings the old
sampler refused now reach metrics.json with nothing but shortening overrides (the DDP run
is in tests/runs/test_ddp_runs.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import FOLDER_SHORT, SHORT, compose_train, write_class_folders

from siamese.data.samplers import ClassBalancedBatchSampler, plan_batches
from siamese.errors import ConfigError, DataError
from siamese.pipelines.train import run_training


@pytest.mark.parametrize(
    ("classes", "batch_size", "m", "processes", "slots"),
    [
        (10, 160, 16, 1, [16] * 10),  # as asked
        (50, 64, 4, 1, [4] * 16),  # as asked
        (10, 40, 16, 1, [16, 16, 8]),  # the remainder is a smaller slot
        (10, 33, 16, 1, [17, 16]),  # a remainder of 1 joins a slot
        (10, 7, 16, 1, [4, 3]),  # less than two slots: two classes share it
        (10, 17, 16, 1, [9, 8]),
        (10, 160, 16, 2, [32] * 10),  # 20 classes asked of 10: every class, 32 each
        (10, 64, 4, 1, [7] * 4 + [6] * 6),  # 16 asked of 10: 64 spread over all 10
        (3, 1000, 16, 1, [334, 333, 333]),
        (10, 20, 16, 2, [16, 16, 8]),  # the global batch counts, not each process's
        (10, 8, 1, 1, [2] * 4),  # samples_per_class=1 -> 2
        (2, 2, 16, 1, [2]),  # room for one class only
        (2, 3, 16, 1, [3]),
        (2, 1, 16, 2, [2]),  # one image per process: a class split in two
    ],
)
def test_plan_slots(classes, batch_size, m, processes, slots):
    plan = plan_batches(classes, batch_size, m, processes)
    assert list(plan.slots) == slots
    assert sum(plan.slots) == plan.global_batch == batch_size * processes
    asked = m >= 2 and batch_size * processes == m * len(slots) and set(slots) == {m}
    assert plan.adapted is not asked


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ((10, 160, 16, 1), "batches: 10 classes x 16 images"),
        (
            (10, 40, 16, 1),
            "batches: 40 images = 16 + 16 + 8 of 3 classes "
            "(data.batch_size=40 is not a multiple of data.samples_per_class=16)",
        ),
        (
            (10, 7, 16, 1),
            "batches: 7 images = 4 + 3 of 2 classes "
            "(data.batch_size=7 is less than 2 x data.samples_per_class=16: 2 classes share it)",
        ),
        (
            (10, 64, 4, 1),
            "batches: 64 images = 4 classes x 7 + 6 classes x 6 images "
            "(asked 64 / 4 = 16 classes; the training split has 10)",
        ),
        (
            (10, 160, 16, 2),
            "batches: global batches of 320 images on 2 processes (160 each) = 10 classes x 32 "
            "images (asked 2 x 160 / 16 = 20 classes; the training split has 10)",
        ),
        (
            (10, 20, 16, 2),
            "batches: global batches of 40 images on 2 processes (20 each) = 16 + 16 + 8 of 3 "
            "classes (the global batch of 2 x 20 = 40 is not a multiple of "
            "data.samples_per_class=16)",
        ),
        (
            (2, 2, 16, 1),
            "batches: 1 class x 2 images "
            "(data.batch_size=2 has room for one class only: no different-class pairs)",
        ),
        (
            (10, 8, 1, 1),
            "batches: 4 classes x 2 images (data.samples_per_class=1 gives no same pairs; 2 are "
            "used)",
        ),
    ],
)
def test_plan_line(args, line):
    assert plan_batches(*args).describe() == line


def batch_counts(targets: torch.Tensor, batch: list[int]) -> tuple[list[int], dict[int, list]]:
    """Images per class (largest first) and, per class, how often each of its images occurs."""
    idx = torch.tensor(batch)
    labels = targets[idx]
    times = {c: idx[labels == c].unique(return_counts=True)[1].tolist() for c in labels.unique()}
    return sorted(torch.bincount(labels).tolist(), reverse=True), {
        int(c): t for c, t in times.items()
    }


def test_a_class_of_two_images_next_to_classes_of_300():
    """The small class repeats its 2 images as evenly as possible; no other image repeats."""
    targets = torch.cat([torch.zeros(2), torch.arange(1, 10).repeat_interleave(300)]).long()
    sampler = ClassBalancedBatchSampler(targets, 160, 16, seed=0)
    assert len(sampler) == 2702 // 160 and not sampler.plan.adapted
    for batch in sampler:
        counts, times = batch_counts(targets, batch)
        assert counts == [16] * 10  # all 10 classes in every batch
        assert times[0] == [8, 8]
        assert all(t == [1] * 16 for c, t in times.items() if c != 0)
    # 40 = 16 + 16 + 8: when drawn, the small class gets the 8 (each image 4 times).
    sampler = ClassBalancedBatchSampler(targets, 40, 16, seed=0)
    drawn = [batch_counts(targets, b)[1] for b in sampler if 0 in targets[b].tolist()]
    assert drawn and all(t[0] == [4, 4] for t in drawn)


def test_every_class_is_visited_equally_often_and_the_epoch_is_seeded():
    targets = torch.arange(400) % 10
    sampler = ClassBalancedBatchSampler(targets, 40, 16, seed=4)  # 16 + 16 + 8
    epoch = list(sampler)
    assert len(epoch) == 10 and all(len(b) == 40 and len(set(b)) == 40 for b in epoch)
    visits = torch.zeros(10, dtype=torch.long)
    for batch in epoch:
        visits[targets[batch].unique()] += 1
    assert visits.tolist() == [3] * 10  # 30 slots: three shuffled rounds of the 10 classes
    assert list(sampler) == epoch
    sampler.set_epoch(1)
    assert list(sampler) != epoch


def test_an_adapted_ddp_plan_resumes_mid_epoch_with_the_same_parts():
    targets = torch.arange(300) % 3  # 2 x 24 images asked as 12 classes of 4: 16 each of 3
    parts = [
        ClassBalancedBatchSampler(targets, 24, 4, seed=5, rank=r, world_size=2) for r in (0, 1)
    ]
    for p in parts:
        p.set_epoch(2)
    epoch = [list(p) for p in parts]
    one = ClassBalancedBatchSampler(targets, 48, 4, seed=5)
    one.set_epoch(2)
    assert [a + b for a, b in zip(*epoch, strict=True)] == list(one)
    resumed = ClassBalancedBatchSampler(targets, 24, 4, seed=5, rank=1, world_size=2)
    resumed.resume(2, 4)
    assert list(resumed) == epoch[1][4:]


@pytest.mark.parametrize(
    ("targets", "batch_size", "error", "message"),
    [
        (
            torch.tensor([0, 0, 0, 1, 2]),
            8,
            DataError,
            "the training split has 1 class with 2 or more images (3 classes in all); "
            "class-balanced batches need 2 such classes for same and different pairs: add "
            "images to more classes, or hold out fewer for validation and test",
        ),
        (
            torch.tensor([0, 0, 1, 1]),
            1,
            ConfigError,
            "data.batch_size=1 gives global batches of 1 images; in-batch pairs need at least "
            "2: use data.batch_size=2 or more",
        ),
    ],
)
def test_what_cannot_train_is_refused_in_one_line(targets, batch_size, error, message):
    with pytest.raises(error) as err:
        ClassBalancedBatchSampler(targets, batch_size, 16)
    assert str(err.value) == message


def train_and_plan(overrides: list[str], out: Path, caplog) -> tuple[dict, list[str]]:
    """Run training in-process; metrics.json and the logged plan lines."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="siamese.data"):
        run_training(compose_train([*SHORT, *overrides], out))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batches:")]
    return json.loads((out / "metrics.json").read_text()), lines


# Every class gets 20 images: the stratified split then leaves two in each val class.
@pytest.mark.slow  # ~4 s each
@pytest.mark.parametrize(
    ("classes", "line"),
    [
        (2, "batches: 2 classes x 32 images (asked 64 / 4 = 16 classes; the training split has 2)"),
        (
            3,
            "batches: 64 images = 22 + 21 + 21 of 3 classes (asked 64 / 4 = 16 classes; the "
            "training split has 3)",
        ),
        (
            10,
            "batches: 64 images = 4 classes x 7 + 6 classes x 6 images (asked 64 / 4 = 16 "
            "classes; the training split has 10)",
        ),
        (50, None),  # 16 classes x 4, as asked
    ],
)
def test_image_folders_of_any_number_of_classes_train(tmp_path, caplog, classes, line):
    root = write_class_folders(tmp_path / "data", {f"class{c:02d}": 20 for c in range(classes)})
    metrics, lines = train_and_plan(
        ["data=image_folder", f"data.root={root}", *FOLDER_SHORT], tmp_path / "run", caplog
    )
    assert "test/precision_at_1" in metrics
    assert lines == ([line] if line else [])


@pytest.mark.slow  # ~8 s
def test_a_class_of_two_images_next_to_classes_of_hundreds_trains(tmp_path, caplog):
    counts = {"a": 300, "b": 300, "c": 300, "small": 2}
    root = write_class_folders(tmp_path / "data", counts)
    metrics, lines = train_and_plan(
        ["data=image_folder", f"data.root={root}", *FOLDER_SHORT], tmp_path / "run", caplog
    )
    assert "test/precision_at_1" in metrics
    assert lines == [
        "batches: 4 classes x 16 images (asked 64 / 4 = 16 classes; the training split has 4)"
    ]


@pytest.mark.slow  # ~5 s each
@pytest.mark.parametrize(
    ("batch_size", "line"),
    [
        (
            7,
            "batches: 7 images = 4 + 3 of 2 classes (data.batch_size=7 is less than 2 x "
            "data.samples_per_class=16: 2 classes share it)",
        ),
        (
            40,
            "batches: 40 images = 16 + 16 + 8 of 3 classes (data.batch_size=40 is not a "
            "multiple of data.samples_per_class=16)",
        ),
        (
            1000,
            "batches: 10 classes x 100 images (asked 1000 / 16 = 62 classes; the training "
            "split has 10)",
        ),
    ],
)
def test_batch_sizes_on_the_default_data_train(tmp_path, caplog, batch_size, line):
    metrics, lines = train_and_plan([f"data.batch_size={batch_size}"], tmp_path / "run", caplog)
    assert "test/precision_at_1" in metrics
    assert lines == [line]
