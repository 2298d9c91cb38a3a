"""Verification metrics: a hand-computed example, then sweeps and pair counts by brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from siamese.errors import ConfigError, DataError
from siamese.evaluation import threshold_at_far, verification_metrics

# Eight pairs, four same (S) and four different (D); 0.4 is shared by one S and two D.
#   distance: 0.1  0.2  0.4  0.4  0.4  0.6  0.7  0.9
#   pair:     S    S    S    D    D    S    D    D
DISTANCES = np.array([0.4, 0.1, 0.9, 0.4, 0.2, 0.7, 0.4, 0.6])  # shuffled on purpose


SAME = np.array([False, True, False, True, True, False, False, True])


def test_hand_example():
    # Accepting distance <= t, at each distinct t (TAR = same accepted / 4, FAR = diff / 4):
    #   t:        none  0.1   0.2   0.4   0.6   0.7   0.9
    #   TAR:      0     1/4   2/4   3/4   1     1     1
    #   FAR:      0     0     0     2/4   2/4   3/4   1
    #   FRR:      1     3/4   2/4   1/4   0     0     0
    #   correct:  4     5     6     5     6     5     4     (same accepted + diff rejected)
    # ROC-AUC, counting (same, diff) pairs where same is closer, ties as 1/2:
    #   S0.1: 4, S0.2: 4, S0.4: 1/2 + 1/2 + 1 + 1 = 3, S0.6: 2  ->  13 / 16
    # EER: FAR - FRR goes from -1/2 (t=0.2) to +1/4 (t=0.4); it is zero 2/3 of the way, where
    #   FAR = 0 + 2/3 * 1/2 = 1/3 (and FRR = 1/2 - 2/3 * 1/4 = 1/3).
    # Best accuracy 6/8, first reached at t=0.2; the next distance is 0.4, so threshold 0.3.
    # TAR at FAR <= 1e-3 and 1e-2: the largest t with FAR 0 is 0.2 -> 2/4.
    # TAR at FAR <= 0.5: t=0.6 -> 1. Accuracy at the fixed 0.45 (accepts up to 0.4): 5/8.
    got = verification_metrics(DISTANCES, SAME, target_fars=(1e-3, 1e-2, 0.5), threshold=0.45)
    assert got == pytest.approx(
        {
            "roc_auc": 13 / 16,
            "eer": 1 / 3,
            "tar_at_far_1e-3": 0.5,
            "tar_at_far_1e-2": 0.5,
            "tar_at_far_5e-1": 1.0,
            "verification_accuracy": 0.75,
            "threshold": 0.3,
            "num_pairs": 8.0,
            "num_same": 4.0,
            "accuracy_at_threshold": 0.625,
        },
        rel=1e-12,
    )
    assert list(got) == [
        "roc_auc",
        "eer",
        "tar_at_far_1e-3",
        "tar_at_far_1e-2",
        "tar_at_far_5e-1",
        "verification_accuracy",
        "threshold",
        "num_pairs",
        "num_same",
        "accuracy_at_threshold",
    ]
    # Default targets give the two documented keys; torch input gives the same numbers.
    default = verification_metrics(torch.from_numpy(DISTANCES), torch.from_numpy(SAME))
    assert "tar_at_far_1e-3" in default and "tar_at_far_1e-2" in default
    assert "accuracy_at_threshold" not in default
    assert default["roc_auc"] == got["roc_auc"]
    # threshold_at_far: midway between the last accepted and the first rejected distance.
    assert threshold_at_far(DISTANCES, SAME, 0.5) == pytest.approx(0.65)
    assert threshold_at_far(DISTANCES, SAME, 0.0) == pytest.approx(0.3)
    assert threshold_at_far(DISTANCES, SAME, 1.0) == 0.9  # everything accepted


def test_extremes():
    d = np.array([0.1, 0.2, 0.3, 0.4])
    perfect = verification_metrics(d, np.array([True, True, False, False]))
    assert perfect["roc_auc"] == 1.0
    assert perfect["eer"] == 0.0
    assert perfect["verification_accuracy"] == 1.0
    assert perfect["threshold"] == pytest.approx(0.25)
    inverted = verification_metrics(d, np.array([False, False, True, True]))
    assert inverted["roc_auc"] == 0.0
    assert inverted["eer"] == 1.0
    assert inverted["tar_at_far_1e-2"] == 0.0
    # Best is rejecting everything (2/4, tied with accepting everything; the lower wins):
    # the threshold lies just below the smallest distance.
    assert inverted["verification_accuracy"] == 0.5
    assert inverted["threshold"] == np.nextafter(0.1, -np.inf)
    assert threshold_at_far(d, np.array([False, False, True, True]), 0.1) < 0.1
    # All distances equal: no information.
    flat = verification_metrics(np.ones(4), np.array([True, False, True, False]))
    assert flat["roc_auc"] == 0.5
    assert flat["eer"] == 0.5


def random_pairs(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Distances rounded to 0.05 (many ties), same pairs shifted lower."""
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.4
    distances = np.round((rng.random(n) - 0.25 * same) * 20) / 20
    return distances, same


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_against_pairwise_count(seed):
    d, same = random_pairs(seed)
    ds, dd = d[same], d[~same]
    closer = (ds[:, None] < dd[None, :]).sum()
    tied = (ds[:, None] == dd[None, :]).sum()
    assert tied > 0
    expected = (closer + 0.5 * tied) / (len(ds) * len(dd))
    assert verification_metrics(d, same)["roc_auc"] == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_accuracy_and_eer_against_threshold_sweep(seed):
    d, same = random_pairs(seed)
    fars = (0.0, 1e-2, 0.05, 0.2, 0.5, 1.0)
    got = verification_metrics(d, same, target_fars=fars)
    candidates = np.concatenate([[-np.inf], np.unique(d)])
    far = np.array([np.mean(d[~same] <= t) for t in candidates])
    tar = np.array([np.mean(d[same] <= t) for t in candidates])
    accuracy = np.array([np.mean((d <= t) == same) for t in candidates])
    for target in fars:
        best = max(t for t, f in zip(candidates, far, strict=True) if f <= target)
        key = f"tar_at_far_{np.format_float_scientific(target, trim='-', exp_digits=1)}"
        assert got[key] == np.mean(d[same] <= best), key
        # The returned threshold accepts exactly what the best sweep threshold accepts.
        thr = threshold_at_far(d, same, target)
        np.testing.assert_array_equal(d <= thr, d <= best)
    assert got["verification_accuracy"] == accuracy.max()
    assert np.mean((d <= got["threshold"]) == same) == accuracy.max()
    assert got["threshold"] not in d  # midway, not on a data point
    # EER lies where the FAR and FRR polylines cross: between the last point with FAR < FRR
    # and the next one.
    frr = 1 - tar
    j = np.argmax(far >= frr)
    assert far[j - 1] <= got["eer"] <= far[j]
    assert frr[j] <= got["eer"] <= frr[j - 1]


def test_errors():
    d = np.array([0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="0 same and 3 different"):
        verification_metrics(d, np.zeros(3, dtype=bool))
    with pytest.raises(DataError, match="3 same and 0 different"):
        verification_metrics(d, np.ones(3, dtype=bool))
    with pytest.raises(DataError, match="2 non-finite"):
        verification_metrics(np.array([0.1, np.nan, np.nan]), np.array([True, False, True]))
    with pytest.raises(DataError, match="one entry per pair"):
        verification_metrics(d, np.array([True, False]))
    with pytest.raises(DataError, match="other than 0 and 1"):
        verification_metrics(d, np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match="false accept rate 2"):
        verification_metrics(d, np.array([True, False, True]), target_fars=(2,))
    with pytest.raises(ConfigError, match=r"false accept rate -0\.1"):
        threshold_at_far(d, np.array([True, False, True]), -0.1)
    # 0/1 integers are accepted as labels.
    got = verification_metrics(d, np.array([1, 0, 1]))
    assert got["num_same"] == 2.0


def _accepted_as_stored(d: torch.Tensor, threshold: float) -> torch.Tensor:
    """What a model does with a calibrated threshold: a float32 buffer, float32 distances."""
    buffer = torch.tensor(math.nan)  # SiameseModule.threshold
    buffer.fill_(threshold)
    return d <= buffer


def test_threshold_kept_in_a_float32_buffer_accepts_exactly_the_counted_pairs():
    # The nearest pair is a different one: FAR 0 must accept nothing. A float64 value just
    # below float32(0.3) rounds back onto it in float32, and would accept that pair.
    d = torch.tensor([0.3, 0.5, 0.7, 0.9])
    s = torch.tensor([False, True, True, False])
    th = threshold_at_far(d, s, 0.0)
    assert th < float(d[0]) and np.float32(th) == th  # a float32 value below the distance
    assert not _accepted_as_stored(d, th).any()
    # Adjacent float32 distances whose lower one has an odd last bit: their float64 midpoint
    # rounds (to even) onto the upper one in float32, which would then be accepted too.
    low = np.float32(0.5)
    while np.frombuffer(low.tobytes(), np.uint32)[0] % 2 == 0:
        low = np.nextafter(low, np.float32(1))
    high = np.nextafter(low, np.float32(1))
    assert np.float32((float(low) + float(high)) / 2) == high  # the trap is real
    d = torch.tensor([0.1, float(low), float(high), 0.9], dtype=torch.float32)
    s = torch.tensor([True, True, False, False])
    th = threshold_at_far(d, s, 0.0)  # accept the two same pairs, not the third
    assert _accepted_as_stored(d, th).tolist() == [True, True, False, False]
    best = verification_metrics(d, s)
    assert best["verification_accuracy"] == 1.0
    assert _accepted_as_stored(d, best["threshold"]).tolist() == [True, True, False, False]
    # float64 distances keep float64 thresholds: a midpoint float32 could not represent.
    d64 = np.array([0.1, 0.5, 0.5 + 2**-40, 0.9])
    th64 = threshold_at_far(d64, s.numpy(), 0.0)
    assert 0.5 < th64 < 0.5 + 2**-40
