"""Verification metrics for pair distances: ROC-AUC, EER, TAR@FAR and best-threshold accuracy.

A pair is accepted as "same" when its distance is <= the threshold (a similarity is passed
negated). Everything is read off one sort of the distances, so it costs O(n log n).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from siamese.checks import is_number
from siamese.errors import ConfigError, DataError
from siamese.evaluation.arrays import to_numpy


def verification_metrics(
    distances: Any,
    same: Any,
    *,
    target_fars: Sequence[float] = (1e-3, 1e-2),
    threshold: float | None = None,
) -> dict[str, float]:
    """Score how well pair distances separate same pairs from different pairs.

    Args:
        distances: (P,) distance per pair, lower means more alike.
        same: (P,) bool, True where both items of the pair share a class.
        target_fars: false accept rates for the ``tar_at_far_<far>`` keys.
        threshold: if given, also report ``accuracy_at_threshold`` at this fixed distance.

    Returns:
        ``roc_auc``, ``eer``, ``tar_at_far_<far>`` for each target, ``verification_accuracy``,
        ``threshold`` (the distance giving that accuracy), ``num_pairs``, ``num_same`` and,
        when asked, ``accuracy_at_threshold``.
    """
    fars = [_check_far(far) for far in target_fars]
    roc = _Roc.from_pairs(distances, same)
    out = {"roc_auc": roc.auc(), "eer": roc.eer()}
    for far in fars:
        out[f"tar_at_far_{format_far(far)}"] = roc.tar_at_far(far)
    best = roc.best_accuracy_point()
    out["verification_accuracy"] = float(roc.correct[best] / roc.num_pairs)
    out["threshold"] = roc.threshold_at_point(best)
    out["num_pairs"] = float(roc.num_pairs)
    out["num_same"] = float(roc.num_same)
    if threshold is not None:
        if not is_number(threshold):
            raise ConfigError(f"threshold {threshold!r} must be a finite distance")
        d, s = _check_pairs(distances, same)
        out["accuracy_at_threshold"] = float(np.mean((d <= threshold) == s))
    return out


def threshold_at_far(distances: Any, same: Any, far: float) -> float:
    """The distance threshold with the highest acceptance whose false accept rate is <= far.

    The value lies midway between the last accepted and the first rejected distance, so it
    does not sit on a data point; when even the smallest distance is a false accept beyond
    ``far``, it lies just below that distance (nothing is accepted). It is a value of the
    distances' own precision (float32 distances give a float32 value), so a model that
    stores it as such and compares float32 distances accepts exactly the pairs counted here.
    """
    roc = _Roc.from_pairs(distances, same)
    return roc.threshold_at_point(roc.point_at_far(_check_far(far)))


def format_far(far: float) -> str:
    """Key suffix for a false accept rate: 1e-3 -> "1e-3", 0.05 -> "5e-2"."""
    return np.format_float_scientific(far, trim="-", exp_digits=1)


@dataclass(frozen=True)
class _Roc:
    """Accept counts at every distinct threshold, with point 0 meaning "accept nothing".

    Point t >= 1 accepts every pair with distance <= ``thresholds[t - 1]``.
    """

    thresholds: np.ndarray  # (T,) distinct distances, ascending
    true_accepts: np.ndarray  # (T + 1,) int64: same pairs accepted
    false_accepts: np.ndarray  # (T + 1,) int64: different pairs accepted
    num_same: int
    num_diff: int
    # The precision thresholds are chosen in: float32 for float32 (or narrower) distances,
    # so that a float32 buffer holds the threshold exactly; float64 otherwise.
    precision: type[np.floating] = np.float64

    @classmethod
    def from_pairs(cls, distances: Any, same: Any) -> _Roc:
        distances = to_numpy(distances)
        precision = _precision(distances)
        d, s = _check_pairs(distances, same)
        order = np.argsort(d, kind="stable")
        d, s = d[order], s[order]
        # A threshold can only sit between distinct distances: keep the last of each run.
        last = np.append(d[1:] != d[:-1], True)
        zero = np.zeros(1, dtype=np.int64)
        return cls(
            thresholds=d[last],
            true_accepts=np.concatenate([zero, np.cumsum(s, dtype=np.int64)[last]]),
            false_accepts=np.concatenate([zero, np.cumsum(~s, dtype=np.int64)[last]]),
            num_same=int(s.sum()),
            num_diff=int((~s).sum()),
            precision=precision,
        )

    @property
    def num_pairs(self) -> int:
        return self.num_same + self.num_diff

    @property
    def far(self) -> np.ndarray:
        return self.false_accepts / self.num_diff

    @property
    def tar(self) -> np.ndarray:
        return self.true_accepts / self.num_same

    @property
    def correct(self) -> np.ndarray:
        """Pairs classified right at each point: same accepted plus different rejected."""
        return self.true_accepts + (self.num_diff - self.false_accepts)

    def auc(self) -> float:
        """Trapezoidal area under (FAR, TAR), equal to Mann-Whitney U / (n_same n_diff).

        Each distance run adds (different pairs in it) * (same pairs strictly closer + half
        the same pairs tied with it); doubled, that is an exact integer.
        """
        new_false = np.diff(self.false_accepts)
        twice_u = int((new_false * (self.true_accepts[:-1] + self.true_accepts[1:])).sum())
        return twice_u / (2 * self.num_same * self.num_diff)

    def eer(self) -> float:
        """Equal error rate, FAR = FRR, linearly interpolated between the adjacent points."""
        # FAR - FRR rises from -1 to 1; its sign in integers avoids rounding at the crossing.
        gap = self.false_accepts * self.num_same - (self.num_same - self.true_accepts) * (
            self.num_diff
        )
        j = int(np.argmax(gap >= 0))  # >= 1: point 0 has gap -n_same*n_diff
        far, frr = self.far, 1.0 - self.tar
        if gap[j] == 0:
            return float(far[j])
        before, after = far[j - 1] - frr[j - 1], far[j] - frr[j]
        alpha = -before / (after - before)
        return float(far[j - 1] + alpha * (far[j] - far[j - 1]))

    def point_at_far(self, far: float) -> int:
        """The last point whose FAR <= far (point 0, FAR 0, always qualifies)."""
        return int(np.searchsorted(self.far, far, side="right")) - 1

    def tar_at_far(self, far: float) -> float:
        return float(self.tar[self.point_at_far(far)])

    def best_accuracy_point(self) -> int:
        """The point with the most correct pairs; the smallest threshold among equals."""
        return int(np.argmax(self.correct))

    def threshold_at_point(self, t: int) -> float:
        """A distance that accepts exactly the pairs point t accepts, midway to the next,
        exactly representable in ``precision`` (and so in anything wider)."""
        p = self.precision
        if t == 0:
            return float(np.nextafter(p(self.thresholds[0]), p(-np.inf)))
        low = p(self.thresholds[t - 1])
        if t == len(self.thresholds):
            return float(low)
        high = p(self.thresholds[t])
        mid = p(float(low) + (float(high) - float(low)) / 2)
        # Adjacent floats can round the midpoint onto `high`, which would accept it too.
        return float(mid if low <= mid < high else low)


def _precision(distances: np.ndarray) -> type[np.floating]:
    """float32 for float16/bfloat16/float32 distances, float64 for anything else."""
    narrow = np.issubdtype(distances.dtype, np.floating) and distances.dtype.itemsize <= 4
    return np.float32 if narrow else np.float64


def _check_pairs(distances: Any, same: Any) -> tuple[np.ndarray, np.ndarray]:
    d = to_numpy(distances)
    s = to_numpy(same)
    if d.ndim != 1 or s.ndim != 1 or len(d) != len(s):
        raise DataError(
            f"distances has shape {d.shape} and same has shape {s.shape}; "
            "expected two 1-D arrays with one entry per pair"
        )
    if not np.issubdtype(d.dtype, np.number) or np.issubdtype(d.dtype, np.complexfloating):
        raise DataError(f"distances has dtype {d.dtype}; expected real numbers")
    d = d.astype(np.float64)
    bad = int((~np.isfinite(d)).sum())
    if bad:
        raise DataError(
            f"distances has {bad} non-finite values (NaN or inf) out of {len(d)}; "
            "check the embeddings before evaluating"
        )
    if s.dtype != np.bool_:
        if not np.isin(s, (0, 1)).all():
            raise DataError(
                f"same has dtype {s.dtype} with values other than 0 and 1; "
                "expected a bool array (True for a same-class pair)"
            )
        s = s.astype(bool)
    num_same = int(s.sum())
    if num_same == 0 or num_same == len(s):
        raise DataError(
            f"verification needs both same and different pairs, got {num_same} same and "
            f"{len(s) - num_same} different; build pairs from at least two classes"
        )
    return d, s


def _check_far(far: float) -> float:
    if not is_number(far) or not 0.0 <= far <= 1.0:
        raise ConfigError(f"false accept rate {far!r} must be a number in [0, 1], e.g. 1e-3")
    return float(far)
