"""Open-set identification metrics: DIR, FAR and DIR@FAR of queries searched in a gallery.

The names are those of face and speaker identification (NIST FRVT 1:N, Grother & Ngan; the
IJB-C open-set protocol). A query is *mated* when its true class is in the gallery and
*non-mated* otherwise. At a threshold, a mated query is identified when its best candidate
has its class and its distance is <= the threshold (detection and identification rate, DIR);
a non-mated query whose best distance is <= the threshold is a false alarm (FAR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from siamese.checks import is_number, label_kind
from siamese.errors import ConfigError, DataError
from siamese.evaluation.arrays import to_numpy
from siamese.evaluation.verification import _check_far, format_far

__all__ = ["open_set_metrics"]


def open_set_metrics(
    distance: Any,
    predicted: Any,
    truth: Any,
    gallery_labels: Any,
    threshold: float,
    *,
    fars: Sequence[float] = (1e-2, 1e-1),
) -> dict[str, float]:
    """Score open-set identification decisions taken at ``threshold``.

    Values that have no queries to be computed on are NaN, as the evaluator reports an
    undefined metric (``neg_distance`` without different pairs): ``far``,
    ``rejection_rate`` and every ``dir_at_far_*`` without non-mated queries;
    ``identification_rate``, ``dir`` and every ``dir_at_far_*`` without mated ones.

    Args:
        distance: (Q,) each query's best distance, the one its decision was made on (lower
            means more alike).
        predicted: (Q,) the label of each query's best candidate, before thresholding; None
            where that candidate has no label (never a right answer).
        truth: (Q,) each query's own label (its class folder's name).
        gallery_labels: the labels the gallery holds (one per item, repeats allowed); "" and
            None (items without a class folder) name no class.
        threshold: a query is accepted when its distance is <= this.
        fars: false alarm rates for the ``dir_at_far_<far>`` keys.

    Returns:
        ``identification_rate`` (rank-1 accuracy on mated queries, threshold ignored),
        ``dir`` and ``far`` at the threshold, ``rejection_rate`` (1 - far),
        ``dir_at_far_<far>`` for each rate (the highest DIR over thresholds whose FAR is
        <= the rate; a threshold never splits equal distances), ``known_queries``,
        ``unknown_queries`` and ``threshold``.
    """
    rates = [_check_far(far) for far in fars]
    if not is_number(threshold):
        raise ConfigError(f"threshold {threshold!r} must be a finite distance")
    d, correct, mated = _check_queries(distance, predicted, truth, gallery_labels)
    n_mated, n_unmated = int(mated.sum()), int((~mated).sum())
    accepted = d <= float(threshold)
    nan = math.nan
    out = {
        "identification_rate": float(correct[mated].mean()) if n_mated else nan,
        "dir": float((correct & accepted)[mated].mean()) if n_mated else nan,
        "far": float(accepted[~mated].mean()) if n_unmated else nan,
    }
    # The rejected share itself (1 - 1/3 would round to 0.6666666666666667, not 2/3).
    out["rejection_rate"] = float((~accepted)[~mated].mean()) if n_unmated else nan
    curve = _DirCurve.from_queries(d, correct & mated, ~mated) if n_mated and n_unmated else None
    for rate in rates:
        out[f"dir_at_far_{format_far(rate)}"] = nan if curve is None else curve.dir_at_far(rate)
    out["known_queries"] = int(n_mated)
    out["unknown_queries"] = int(n_unmated)
    out["threshold"] = float(threshold)
    return out


class _DirCurve:
    """DIR and FAR at every distinct distance, point 0 meaning "accept nothing".

    Point t >= 1 accepts every query with distance <= the t-th smallest distinct distance,
    as ``verification._Roc`` does for pairs: equal distances are accepted together.
    """

    def __init__(self, hits: np.ndarray, alarms: np.ndarray, n_mated: int, n_unmated: int):
        self.dir = hits / n_mated  # (T + 1,)
        self.far = alarms / n_unmated  # (T + 1,) ascending

    @classmethod
    def from_queries(cls, d: np.ndarray, hit: np.ndarray, unmated: np.ndarray) -> _DirCurve:
        """``hit``: mated and rightly labelled; mated queries labelled wrong move neither
        rate, but their distances are points too (they change nothing counted)."""
        order = np.argsort(d, kind="stable")
        d, hit, unmated = d[order], hit[order], unmated[order]
        last = np.append(d[1:] != d[:-1], True)  # the last query of each run of equal distances
        zero = np.zeros(1, dtype=np.int64)
        hits = np.concatenate([zero, np.cumsum(hit, dtype=np.int64)[last]])
        alarms = np.concatenate([zero, np.cumsum(unmated, dtype=np.int64)[last]])
        return cls(hits, alarms, len(hit) - int(unmated.sum()), int(unmated.sum()))

    def dir_at_far(self, rate: float) -> float:
        """DIR at the last point whose FAR <= rate; DIR never falls as points accept more."""
        return float(self.dir[int(np.searchsorted(self.far, rate, side="right")) - 1])


def _check_queries(
    distance: Any, predicted: Any, truth: Any, gallery_labels: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q,) float64 distances, bool "predicted the true label", bool "mated"."""
    d = to_numpy(distance)
    pred, true = _labels(predicted), _labels(truth)
    if d.ndim != 1 or len(d) == 0 or pred.shape != d.shape or true.shape != d.shape:
        raise DataError(
            f"distance has shape {tuple(d.shape)}, predicted {tuple(pred.shape)} and truth "
            f"{tuple(true.shape)}; pass one distance and two labels per query, at least one query"
        )
    if not np.issubdtype(d.dtype, np.number) or np.issubdtype(d.dtype, np.complexfloating):
        raise DataError(f"distance has dtype {d.dtype}; expected real numbers")
    d = d.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(d))
    if len(bad):
        raise DataError(
            f"distance has {len(bad)} non-finite values (NaN or inf) out of {len(d)}, first "
            f"at query {bad[0]}; check the embeddings before scoring"
        )
    kind = label_kind(true, "truth")
    empty = [row for row, label in enumerate(true.tolist()) if label == ""]
    if empty:
        raise DataError(
            f"truth has {len(empty)} empty labels (first at query {empty[0]}); score only "
            "queries from class folders"
        )
    # The classes once each: a gallery has many items and few classes.
    known = {g for g in _labels(gallery_labels).reshape(-1).tolist() if g is not None and g != ""}
    _same_kind(np.array(list(known), dtype=object), kind, "gallery_labels")
    named_pred = [p for p in pred.tolist() if p is not None]
    _same_kind(np.array(named_pred, dtype=object), kind, "predicted")
    rows = zip(pred.tolist(), true.tolist(), strict=True)
    correct = np.array([p is not None and p == t for p, t in rows], dtype=bool)
    mated = np.array([t in known for t in true.tolist()], dtype=bool)
    return d, correct, mated


def _labels(labels: Any) -> np.ndarray:
    """Labels as a numpy array; a list of strings and None stays objects (no "None")."""
    if hasattr(labels, "detach"):
        return to_numpy(labels)
    if isinstance(labels, np.ndarray):
        return labels
    if isinstance(labels, str | bytes):  # one label, not a sequence of characters
        return np.array(labels, dtype=object)
    return np.array(list(labels), dtype=object)


def _same_kind(labels: np.ndarray, kind: str, name: str) -> None:
    """Refuse labels of another kind than truth's: "1" never equals 1, so all would miss."""
    if len(labels) and label_kind(labels, name) != kind:
        raise DataError(
            f"{name} holds {label_kind(labels, name)}s but truth holds {kind}s (e.g. "
            f"{labels[0]!r}); pass labels of one kind, such as the class folders' names"
        )
