"""Samplers and pair construction: class balance, coverage, determinism, balance of pairs."""

from __future__ import annotations

import pytest
import torch

from siamese.data.augment import BatchRandomAffine
from siamese.data.datasets import TensorImages
from siamese.data.pairs import PairBatchSampler, PairView, sample_pairs
from siamese.data.samplers import ClassBalancedBatchSampler, EvalBatchSampler
from siamese.errors import ConfigError

TARGETS = torch.arange(10).repeat_interleave(torch.tensor([30, 30, 30, 30, 30, 30, 30, 30, 30, 5]))


def test_class_balanced_batches_have_m_per_class():
    sampler = ClassBalancedBatchSampler(TARGETS, batch_size=32, samples_per_class=8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(TARGETS) // 32
    for batch in batches:
        labels = TARGETS[batch]
        values, counts = labels.unique(return_counts=True)
        assert len(batch) == 32 and len(values) == 4 and (counts == 8).all()


def test_class_balanced_epoch_covers_big_classes_without_repeats_and_is_seeded():
    sampler = ClassBalancedBatchSampler(TARGETS, batch_size=20, samples_per_class=10, seed=3)
    seen = torch.cat([torch.tensor(b) for b in sampler])
    big = seen[TARGETS[seen] != 9]
    # Within one pass over a class's queue no image repeats before the queue is refilled.
    for c in range(9):
        members = big[TARGETS[big] == c]
        first_pass = members[:30]
        assert len(first_pass.unique()) == len(first_pass)
    again = torch.cat([torch.tensor(b) for b in sampler])
    assert torch.equal(seen, again)  # same epoch -> same batches
    sampler.set_epoch(1)
    assert not torch.equal(seen, torch.cat([torch.tensor(b) for b in sampler]))


@pytest.mark.parametrize(
    ("batch_size", "m", "slots"),
    [
        (8, 8, [4, 4]),  # one class of m: two classes share the batch
        (30, 8, [8, 8, 8, 6]),  # not a multiple of m: the remainder is a smaller slot
        (8, 1, [2, 2, 2, 2]),  # samples_per_class=1 gives no same pairs: 2
        (120, 4, [12] * 10),  # 30 classes asked of 10: all 10, 12 images each
    ],
)
def test_batches_the_old_sampler_refused_are_planned_from_the_split(batch_size, m, slots):
    sampler = ClassBalancedBatchSampler(TARGETS, batch_size=batch_size, samples_per_class=m)
    assert list(sampler.plan.slots) == slots and sampler.plan.adapted
    assert len(sampler) == len(TARGETS) // batch_size
    for batch in sampler:
        batch = torch.tensor(batch)
        classes, counts = TARGETS[batch].unique(return_counts=True)
        assert sorted(counts.tolist(), reverse=True) == slots
        for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
            times = batch[TARGETS[batch] == c].unique(return_counts=True)[1]
            # Class 9 (5 images) repeats images only when its slot is larger, as evenly as
            # possible; every other class gives distinct images.
            want = {n // 5, -(-n // 5)} if c == 9 and n > 5 else {1}
            assert set(times.tolist()) <= want, (c, n, times)


def test_the_smaller_slot_goes_to_the_class_with_fewer_images():
    sampler = ClassBalancedBatchSampler(TARGETS, batch_size=30, samples_per_class=8, seed=2)
    with_nine = [b for b in sampler if 9 in TARGETS[b].tolist()]
    assert with_nine  # class 9 is visited as often as any other
    for batch in with_nine:
        assert int((TARGETS[batch] == 9).sum()) == 6


def test_small_class_is_sampled_with_replacement_each_image_equally_often():
    sampler = ClassBalancedBatchSampler(TARGETS, batch_size=100, samples_per_class=10, seed=0)
    batch = torch.tensor(next(iter(sampler)))
    small = batch[TARGETS[batch] == 9]  # class 9 has only 5 images: each twice
    assert sorted(small.unique(return_counts=True)[1].tolist()) == [2] * 5


def test_eval_batches_cover_everything_once_in_a_fixed_order():
    s = EvalBatchSampler(103, 25, seed=0)
    order = torch.cat([torch.tensor(b) for b in s])
    assert len(s) == 5 and sorted(order.tolist()) == list(range(103))
    assert torch.equal(order, torch.cat([torch.tensor(b) for b in EvalBatchSampler(103, 25, 0)]))


@pytest.mark.parametrize("n_items", [200, 3000])  # enumerated vs sampled with replacement
def test_sample_pairs_is_balanced_correct_and_deterministic(n_items):
    labels = torch.arange(n_items) % 7
    pairs = sample_pairs(labels, 1000, seed=5)
    assert len(pairs.same) == 1000 and pairs.same.sum() == 500
    assert torch.equal(pairs.same, labels[pairs.first] == labels[pairs.second])
    assert (pairs.first != pairs.second).all()
    again = sample_pairs(labels, 1000, seed=5)
    assert torch.equal(pairs.first, again.first) and torch.equal(pairs.second, again.second)
    assert not torch.equal(pairs.first, sample_pairs(labels, 1000, seed=6).first)


def test_sample_pairs_small_set_uses_distinct_pairs_and_stays_balanced_when_short():
    labels = torch.tensor([0, 0, 1, 1, 2])  # 2 same pairs, 8 different pairs exist
    pairs = sample_pairs(labels, 10, seed=0)
    assert pairs.same.sum() == 2 and (~pairs.same).sum() == 2  # both same pairs, 2 of 8
    assert torch.equal(pairs.same, labels[pairs.first] == labels[pairs.second])
    keys = set(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True))
    assert len(keys) == 4 and {(0, 1), (2, 3)} <= keys
    odd = sample_pairs(labels, 3, seed=0)  # enough of both: 2 same (the larger half), 1 not
    assert odd.same.sum() == 2 and len(odd.same) == 3
    singletons = sample_pairs(torch.arange(5), 6, seed=0)  # no same pair: different alone
    assert len(singletons.same) == 3 and not singletons.same.any()


def test_sample_pairs_with_replacement_handles_singletons_and_one_class():
    labels = torch.cat([torch.zeros(2500, dtype=torch.long), torch.arange(1, 11)])
    pairs = sample_pairs(labels, 400, seed=0)
    assert torch.equal(pairs.same, labels[pairs.first] == labels[pairs.second])
    assert (pairs.first != pairs.second).all()
    only_one = sample_pairs(torch.zeros(3000, dtype=torch.long), 100, seed=0)
    assert only_one.same.all() and len(only_one.same) == 50


def test_explicit_pair_batches_through_pair_view():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2)
    labels = torch.arange(40) % 4
    view = PairView(TensorImages(images, labels, ["a", "b", "c", "d"]))
    sampler = PairBatchSampler(labels, batch_size=16, num_pairs=40, seed=0)
    batches = [view.__getitems__(b) for b in sampler]
    assert len(batches) == len(sampler) == 3
    x1, x2, same = batches[0]
    assert x1.shape == (16, 1, 2, 2) and same.dtype == torch.bool
    idx1 = (x1[:, 0, 0, 0] * 255).round().long()
    idx2 = (x2[:, 0, 0, 0] * 255).round().long()
    assert torch.equal(same, labels[idx1] == labels[idx2])
    assert sum(int(b[2].sum()) for b in batches) == 20  # half of the 40 pairs are same


def test_batch_affine_identity_and_shape():
    images = torch.rand(6, 3, 20, 16)
    identity = BatchRandomAffine(degrees=0, translate=0, scale=(1, 1), shear=0)
    assert torch.allclose(identity(images), images, atol=1e-5)
    aug = BatchRandomAffine(degrees=20, translate=0.1, scale=(0.8, 1.2), shear=10, hflip=0.5)
    out = aug(images)
    assert out.shape == images.shape and not torch.allclose(out, images)
    never = BatchRandomAffine(degrees=30, p=0.0)
    assert torch.allclose(never(images), images, atol=1e-5)


def test_batch_affine_flip_is_a_mirror():
    images = torch.rand(4, 1, 8, 8)
    flip = BatchRandomAffine(degrees=0, translate=0, scale=(1, 1), hflip=1.0)
    assert torch.allclose(flip(images), images.flip(-1), atol=1e-5)


def test_elastic_field_is_bounded_by_alpha_and_changes_images():
    aug = BatchRandomAffine(degrees=0, translate=0, scale=(1, 1), elastic_alpha=2.0)
    field = aug.elastic_field(5, 28, 20, torch.device("cpu"))  # (B, H, W, 2), grid units
    assert field.shape == (5, 28, 20, 2)
    # Largest displacement: alpha pixels = alpha * 2 / size in grid units, on each axis.
    assert torch.allclose(field[..., 0].abs().amax(dim=(1, 2)), torch.full((5,), 2.0 * 2 / 20))
    assert torch.allclose(field[..., 1].abs().amax(dim=(1, 2)), torch.full((5,), 2.0 * 2 / 28))
    images = torch.rand(5, 1, 28, 20)
    assert not torch.allclose(aug(images), images)
    with pytest.raises(ConfigError, match=r"data.augment.elastic_alpha=-1.0 must be >= 0"):
        BatchRandomAffine(elastic_alpha=-1.0)
