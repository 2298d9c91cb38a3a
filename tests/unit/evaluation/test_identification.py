"""Open-set identification metrics: a hand-computed example, ties, undefined rates, bad input,
and DIR@FAR against a loop over every threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from siamese.errors import ConfigError, DataError
from siamese.evaluation import open_set_metrics
from siamese.evaluation.verification import format_far

# The gallery holds classes a, b, c ("" is an item without a class folder). Seven queries:
#   query:      q0   q1   q2   q3   q4   q5   q6
#   truth:      a    b    c    a    x    y    y       x, y: not in the gallery (non-mated)
#   predicted:  a    b    a    a    b    c    a
#   distance:   0.2  0.5  0.3  0.8  0.5  0.9  0.95
#   kind:       hit  hit  miss hit  U    U    U       hit: mated, predicted right
GALLERY = ["a", "a", "b", "c", ""]
TRUTH = ["a", "b", "c", "a", "x", "y", "y"]
PREDICTED = ["a", "b", "a", "a", "b", "c", "a"]
DISTANCE = np.array([0.2, 0.5, 0.3, 0.8, 0.5, 0.9, 0.95])


def test_hand_example():
    # At threshold 0.6 (accepts 0.2, 0.3, 0.5, 0.5):
    #   identification_rate: hits q0, q1, q3 of 4 mated = 3/4 (threshold ignored)
    #   dir: hits accepted q0, q1 = 2/4;  far: non-mated accepted q4 = 1/3;  rejection 2/3
    # Every point (distinct distance accepted), DIR = hits / 4, FAR = non-mated / 3:
    #   t:    none  0.2  0.3  0.5  0.8  0.9  0.95
    #   DIR:  0     1/4  1/4  2/4  3/4  3/4  3/4
    #   FAR:  0     0    0    1/3  1/3  2/3  1
    # FAR <= 1e-2 and 1e-1: t = 0.3 -> 1/4. q1 (a hit) ties q4 (non-mated) at 0.5, so no
    # threshold takes q1 without q4: splitting the tie would give 2/4. FAR <= 0.4: t = 0.8
    # -> 3/4; FAR <= 1: 3/4.
    got = open_set_metrics(DISTANCE, PREDICTED, TRUTH, GALLERY, 0.6)
    assert got == pytest.approx(
        {
            "identification_rate": 0.75,
            "dir": 0.5,
            "far": 1 / 3,
            "rejection_rate": 2 / 3,
            "dir_at_far_1e-2": 0.25,
            "dir_at_far_1e-1": 0.25,
            "known_queries": 4,
            "unknown_queries": 3,
            "threshold": 0.6,
        },
        rel=1e-12,
    )
    assert list(got)[:6] == [
        "identification_rate",
        "dir",
        "far",
        "rejection_rate",
        "dir_at_far_1e-2",
        "dir_at_far_1e-1",
    ]
    wide = open_set_metrics(DISTANCE, PREDICTED, TRUTH, GALLERY, 0.6, fars=(0.4, 1.0, 0.0))
    assert [wide[f"dir_at_far_{format_far(r)}"] for r in (0.4, 1.0, 0.0)] == [0.75, 0.75, 0.25]
    # A threshold equal to a distance accepts it (<=): at 0.5 both q1 and q4 are in.
    at = open_set_metrics(DISTANCE, PREDICTED, TRUTH, GALLERY, 0.5)
    assert (at["dir"], at["far"]) == (0.5, pytest.approx(1 / 3))
    # Below every distance nothing is accepted: DIR 0, every non-mated query rejected.
    low = open_set_metrics(DISTANCE, PREDICTED, TRUTH, GALLERY, 0.0)
    assert (low["dir"], low["far"], low["rejection_rate"]) == (0.0, 0.0, 1.0)
    assert low["identification_rate"] == 0.75


def test_inputs_of_other_types_give_the_same_numbers():
    ref = open_set_metrics(DISTANCE, PREDICTED, TRUTH, GALLERY, 0.6)
    as_arrays = open_set_metrics(
        torch.tensor(DISTANCE, dtype=torch.float32),
        np.array(PREDICTED),
        tuple(TRUTH),
        set(GALLERY),
        np.float32(0.6),
    )
    assert as_arrays == pytest.approx(ref, rel=1e-6)
    # Integer classes: 0 = a, 1 = b, 2 = c, 8 = x, 9 = y.
    code = {"a": 0, "b": 1, "c": 2, "x": 8, "y": 9}
    ints = open_set_metrics(
        DISTANCE,
        [code[p] for p in PREDICTED],
        np.array([code[t] for t in TRUTH]),
        torch.tensor([0, 0, 1, 2]),
        0.6,
    )
    assert ints == pytest.approx(ref, rel=1e-12)


def test_unlabelled_best_candidate_is_a_miss():
    # q0's best candidate has no label: identification falls from 3/4 to 2/4, DIR to 1/4.
    got = open_set_metrics(DISTANCE, [None, *PREDICTED[1:]], TRUTH, GALLERY, 0.6)
    assert (got["identification_rate"], got["dir"]) == (0.5, 0.25)


def test_undefined_rates_are_nan():
    mated = open_set_metrics(DISTANCE[:4], PREDICTED[:4], TRUTH[:4], GALLERY, 0.6)
    assert (mated["identification_rate"], mated["dir"]) == (0.75, 0.5)
    assert (mated["known_queries"], mated["unknown_queries"]) == (4.0, 0.0)
    for key in ("far", "rejection_rate", "dir_at_far_1e-2", "dir_at_far_1e-1"):
        assert math.isnan(mated[key]), key
    unmated = open_set_metrics(DISTANCE[4:], PREDICTED[4:], TRUTH[4:], GALLERY, 0.6)
    assert (unmated["far"], unmated["rejection_rate"]) == (pytest.approx(1 / 3), 2 / 3)
    for key in ("identification_rate", "dir", "dir_at_far_1e-2", "dir_at_far_1e-1"):
        assert math.isnan(unmated[key]), key
    # An empty gallery: every query is non-mated.
    assert open_set_metrics(DISTANCE, PREDICTED, TRUTH, ["", None], 0.6)["unknown_queries"] == 7


def brute_dir_at_far(d, hit, unmated, rate):
    """Best DIR over every threshold (accept nothing, or each distance) with FAR <= rate."""
    best = 0.0
    for t in [-np.inf, *d]:
        accepted = d <= t
        if accepted[unmated].mean() <= rate:
            best = max(best, accepted[hit].sum() / (~unmated).sum())
    return best


def test_dir_at_far_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(5):
        q = 150
        truth = rng.integers(0, 10, q)  # classes 0..6 are in the gallery, 7..9 are not
        predicted = np.where(rng.random(q) < 0.7, truth, rng.integers(0, 7, q))
        unmated = truth >= 7
        # Non-mated queries lie a little farther; one decimal makes many ties.
        d = np.round(rng.random(q) + 0.3 * unmated, 1)
        hit = ~unmated & (predicted == truth)
        rates = (0.0, 1e-2, 0.05, 0.1, 0.25, 0.5, 1.0)
        threshold = float(rng.choice(d))
        got = open_set_metrics(d, predicted, truth, np.arange(7), threshold, fars=rates)
        for rate in rates:
            want = brute_dir_at_far(d, hit, unmated, rate)
            assert got[f"dir_at_far_{format_far(rate)}"] == want, (trial, rate)
        accepted = d <= threshold
        assert got["dir"] == accepted[hit].sum() / (~unmated).sum()
        assert got["far"] == accepted[unmated].mean()
        assert got["identification_rate"] == hit.sum() / (~unmated).sum()


def test_bad_inputs():
    args = (DISTANCE, PREDICTED, TRUTH, GALLERY)
    with pytest.raises(DataError, match=r"distance has shape \(6,\), predicted \(7,\)"):
        open_set_metrics(DISTANCE[:6], PREDICTED, TRUTH, GALLERY, 0.6)
    with pytest.raises(DataError, match="at least one query"):
        open_set_metrics([], [], [], GALLERY, 0.6)
    with pytest.raises(DataError, match="1 non-finite values .* first at query 2"):
        open_set_metrics(np.where(np.arange(7) == 2, np.nan, DISTANCE), *args[1:], 0.6)
    with pytest.raises(ConfigError, match="threshold nan must be a finite distance"):
        open_set_metrics(*args, float("nan"))
    with pytest.raises(ConfigError, match="threshold None"):
        open_set_metrics(*args, None)
    with pytest.raises(ConfigError, match="false accept rate 2.0"):
        open_set_metrics(*args, 0.6, fars=(2.0,))
    with pytest.raises(DataError, match="truth has 1 empty labels .*first at query 3"):
        open_set_metrics(DISTANCE, PREDICTED, ["a", "b", "c", "", "x", "y", "y"], GALLERY, 0.6)
    with pytest.raises(DataError, match="gallery_labels holds numbers but truth holds strings"):
        open_set_metrics(*args[:3], [0, 1, 2], 0.6)
    with pytest.raises(DataError, match="predicted holds numbers but truth holds strings"):
        open_set_metrics(DISTANCE, [0] * 7, TRUTH, GALLERY, 0.6)
    with pytest.raises(DataError, match="truth has None at row 0"):
        open_set_metrics(DISTANCE, PREDICTED, [None, *TRUTH[1:]], GALLERY, 0.6)
    with pytest.raises(DataError, match="distance has dtype"):
        open_set_metrics(np.array(["0.1"] * 7), PREDICTED, TRUTH, GALLERY, 0.6)
