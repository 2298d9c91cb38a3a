"""stratified_split: exact held-out sizes by class, one item per class kept in train, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from siamese.data.sources import stratified_split
from siamese.errors import ConfigError


def test_stratified_split_exact_sizes_proportional_and_disjoint():
    labels = np.repeat(np.arange(4), [40, 20, 10, 3])
    train, (val, test) = stratified_split(labels, {"val_size": 15, "test_size": 7}, seed=0)
    assert (len(train), len(val), len(test)) == (51, 15, 7)
    together = np.concatenate([train, val, test])
    assert np.array_equal(np.sort(together), np.arange(labels.size))
    # 15 of 73 is 20.5%: 8, 4, 2, 1 (largest remainders) for classes of 40, 20, 10, 3.
    assert sum(np.bincount(labels[val], minlength=4)) == 15
    assert np.all(
        np.abs(np.bincount(labels[val], minlength=4) - 15 * np.array([40, 20, 10, 3]) / 73) < 1
    )
    assert np.all(np.bincount(labels[train], minlength=4) >= 1)


def test_stratified_split_keeps_one_per_class_in_train():
    labels = np.repeat(np.arange(5), [1, 2, 2, 2, 30])
    train, (held,) = stratified_split(labels, {"val_size": 10}, seed=3)
    assert np.all(np.bincount(labels[train], minlength=5) >= 1)
    assert len(held) == 10
    with pytest.raises(ConfigError, match="val_size asks for 33"):
        stratified_split(labels, {"val_size": 33}, seed=0)


def test_stratified_split_seeded():
    labels = np.repeat(np.arange(3), 20)
    a = stratified_split(labels, {"v": 9}, seed=1)
    b = stratified_split(labels, {"v": 9}, seed=1)
    c = stratified_split(labels, {"v": 9}, seed=2)
    assert np.array_equal(a[1][0], b[1][0])
    assert not np.array_equal(a[1][0], c[1][0])
