"""The data module: split checks, resizing, batch shapes, augmentation, splits on the device."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TinySource, assert_fragments

from siamese.data import DataSplits, SiameseDataModule
from siamese.data.augment import BatchRandomAffine
from siamese.data.sources import ImageFolder
from siamese.errors import ConfigError, DataError


def test_in_batch_and_explicit_batches_have_the_documented_shapes():
    dm = SiameseDataModule(TinySource(), batch_size=8, samples_per_class=2, eval_batch_size=5)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 12, 10) and images.dtype == torch.float32
    assert labels.unique(return_counts=True)[1].tolist() == [2, 2, 2, 2]
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 12  # every val image once

    dm = SiameseDataModule(TinySource(), batch_size=5, pair_mode="explicit", pairs_per_epoch=12)
    x1, x2, same = next(iter(dm.train_dataloader()))
    assert x1.shape == x2.shape == (5, 1, 12, 10) and same.dtype == torch.bool
    assert len(dm.train_dataloader()) == 3


def test_image_size_resizes_every_split_once():
    dm = SiameseDataModule(TinySource(), batch_size=8, samples_per_class=2, image_size=[16, 20])
    assert dm.image_shape == (1, 16, 20)
    assert all(s.images.shape[2:] == (16, 20) for s in dm.load_splits().as_tuple())
    with pytest.raises(ConfigError, match="data.image_size must be"):
        SiameseDataModule(TinySource(), image_size=[0, 4])


def test_a_split_without_any_same_pair_is_refused():
    dm = SiameseDataModule(TinySource(lonely_val=True), batch_size=8, samples_per_class=2)
    with pytest.raises(DataError, match="no class in the val split has two images"):
        dm.setup("fit")


def test_one_class_is_refused_before_any_batch_size_advice():
    """One class: no batch size or samples_per_class can help, so neither is suggested."""
    dm = SiameseDataModule(TinySource(classes=1), batch_size=8, samples_per_class=2)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert_fragments(
        str(err.value),
        "the data holds 1 class",
        "pairs need at least 2",
        "add a sub-folder of images for each class",
    )
    # Other classes only in the held-out splits: training still has one.
    dm = SiameseDataModule(TinySource(classes=1, lonely_val=True), batch_size=8)
    with pytest.raises(DataError, match="^the train split of the data holds 1 class; training"):
        dm.setup("fit")


def test_batches_are_planned_when_the_data_is_loaded_and_the_plan_logged_once(caplog):
    """4 classes of 2 asked of 3 classes: every class, 3 + 3 + 2 images (6 of each in train)."""
    dm = SiameseDataModule(TinySource(classes=3), batch_size=8, samples_per_class=2)
    with caplog.at_level(logging.INFO, logger="siamese.data"):
        dm.setup("fit")
        plan = dm.check_batches()
        _, labels = next(iter(dm.train_dataloader()))
    assert plan.slots == (3, 3, 2)
    assert sorted(labels.unique(return_counts=True)[1].tolist()) == [2, 3, 3]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batches:")]
    assert lines == [
        "batches: 8 images = 3 + 3 + 2 of 3 classes "
        "(asked 8 / 2 = 4 classes; the training split has 3)"
    ]


def test_training_needs_two_classes_with_two_images():
    # Train: class 0 has 6 images, classes 1 and 2 one each (val and test have pairs).
    source = TinySource(classes=3)
    splits = source.load(None)
    splits = DataSplits(splits.train.subset([0, 1, 2, 3, 4, 5, 6, 12]), splits.val, splits.test)
    dm = SiameseDataModule(SimpleNamespace(load=lambda root: splits), batch_size=8)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert_fragments(
        str(err.value),
        "the training split has 1 class with 2 or more images (3 classes in all)",
        "need 2 such classes",
        "add images to more classes, or hold out fewer for validation and test",
    )


def test_input_stats_are_per_channel_mean_and_std():
    dm = SiameseDataModule(TinySource(), batch_size=8, samples_per_class=2)
    mean, std = dm.input_stats()
    train = dm.load_splits().train.images.float() / 255
    assert mean == pytest.approx([train.mean().item()], abs=1e-5)
    assert std == pytest.approx([train.std().item()], abs=1e-5)


def test_augmentation_runs_in_training_only():
    aug = BatchRandomAffine(degrees=30)
    dm = SiameseDataModule(TinySource(), batch_size=8, samples_per_class=2, augment=aug)
    batch = (torch.rand(4, 1, 12, 10), torch.arange(4))
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(batch, 0)[0] is batch[0]
    dm.trainer = SimpleNamespace(training=True)
    out = dm.on_after_batch_transfer(batch, 0)
    assert out[0].shape == batch[0].shape and not torch.allclose(out[0], batch[0])
    x1, x2, _ = dm.on_after_batch_transfer((batch[0], batch[0].clone(), torch.ones(4)), 0)
    assert not torch.allclose(x1, x2)  # each side gets its own warp


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pair_mode": "triplets"}, "data.pair_mode='triplets'"),
        ({"batch_size": 1}, "at least 2"),
        ({"skip_bad_files": "yes"}, "data.skip_bad_files must be true or false, got 'yes'"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SiameseDataModule(TinySource(), **kwargs)


def test_concat_images_reads_parts_as_one_in_any_order():
    from siamese.data.datasets import ConcatImages, TensorImages

    a = TensorImages(
        torch.arange(16).reshape(4, 1, 2, 2).to(torch.uint8), torch.tensor([0, 1, 0, 1]), ["x", "y"]
    )
    b = TensorImages(
        torch.arange(100, 112).reshape(3, 1, 2, 2).to(torch.uint8),
        torch.tensor([1, 1, 0]),
        ["x", "y"],
    )
    both = ConcatImages([a, b])
    assert len(both) == 7 and both.targets.tolist() == [0, 1, 0, 1, 1, 1, 0]
    images, labels = both.__getitems__([5, 0, 3, 6])
    # First pixel of items 5, 0, 3, 6: b[1] = 104, a[0] = 0, a[3] = 12, b[2] = 108.
    assert (images[:, 0, 0, 0] * 255).round().tolist() == [104, 0, 12, 108]
    assert labels.tolist() == [1, 0, 1, 0]
    again, _ = both.subset([5, 0, 3, 6]).__getitems__([0, 1, 2, 3])
    assert torch.equal(again, images)
    other = TensorImages(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), ["p", "q"])
    with pytest.raises(DataError, match="different classes or image shapes"):
        ConcatImages([a, other])


# -- speed: splits held on the device (no GPU here: torch's meta device stands in) -------
def meta_datamodule(monkeypatch, **kwargs) -> SiameseDataModule:
    dm = SiameseDataModule(TinySource(), batch_size=8, samples_per_class=2, **kwargs)
    monkeypatch.setattr(dm, "_device", lambda: torch.device("meta"))
    dm.setup("fit")
    return dm


def test_in_memory_splits_are_sliced_on_the_device(monkeypatch):
    dm = meta_datamodule(monkeypatch, num_workers=2, pin_memory=True, eval_batch_size=5)
    loader = dm.train_dataloader()
    # Device tensors are sliced in this process: no workers to copy them, nothing to pin.
    assert loader.num_workers == 0 and not loader.pin_memory
    images, labels = next(iter(loader))
    assert images.device.type == labels.device.type == "meta"
    assert images.shape == (8, 1, 12, 10) and images.dtype == torch.float32
    images, labels, items = next(iter(dm.val_dataloader()))
    assert images.device.type == "meta" and items.device.type == "cpu"
    # The CPU splits stay as they were, for the pictures and statistics.
    assert dm.load_splits().train.images.device.type == "cpu"


def test_on_device_false_keeps_batches_on_the_cpu(monkeypatch):
    dm = meta_datamodule(monkeypatch, on_device=False, num_workers=1)
    assert dm.train_dataloader().num_workers == 1
    images, _ = next(iter(dm.train_dataloader()))
    assert images.device.type == "cpu"


def test_on_device_true_refuses_files_and_bad_values(tmp_path: Path, monkeypatch):
    from helpers import make_image_folder

    make_image_folder(tmp_path, {"a": 8, "b": 8})
    source = ImageFolder(channels=1, val_fraction=0.25, test_fraction=0.25, seed=0)
    dm = SiameseDataModule(
        source, root=str(tmp_path), batch_size=4, samples_per_class=2, image_size=8, on_device=True
    )
    monkeypatch.setattr(dm, "_device", lambda: torch.device("meta"))
    with pytest.raises(ConfigError, match="data.on_device=true needs in-memory"):
        dm.setup("fit")
    dm.on_device = "auto"  # files stay on the CPU without complaint
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].device.type == "cpu"
    with pytest.raises(ConfigError, match="data.on_device='gpu' is unknown"):
        SiameseDataModule(TinySource(), on_device="gpu")
