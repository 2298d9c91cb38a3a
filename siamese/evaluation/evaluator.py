"""The evaluator: one split's embeddings -> one report (metrics, pair distances, neighbours).

Training's validation and test, ``evaluate.py`` and the dashboard pictures all ask an
``Evaluator``, so their numbers and figures are equal by construction (the
open-metric-learning ``EmbeddingMetrics`` shape): ``evaluate`` scores the arrays and
returns an ``EvalReport``; ``draw`` turns a report into figures. Arrays in, numbers and
pictures out: a model's own pair distance (a learned head too) comes in as a callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch

from siamese.errors import ConfigError
from siamese.evaluation.arrays import to_numpy
from siamese.evaluation.index import METRICS, build_index
from siamese.evaluation.oneshot import Scorer, oneshot_metrics
from siamese.evaluation.retrieval import PairScorer, retrieval_metrics, scored_retrieval_metrics
from siamese.evaluation.verification import threshold_at_far, verification_metrics

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    from matplotlib.figure import Figure

# (first (P, D), second (P, D)) -> (P,) distances, lower means more alike.
PairDistance = Callable[[np.ndarray, np.ndarray], np.ndarray]
# Neighbours kept per query for the pictures, the most a retrieval row shows: a longer row
# is unreadable, and drawing 8 x 499 thumbnails (top_k=100000 on 500 images) looks like a hang.
MAX_TOP_K = 20
# Queries (a fixed-seed sample of the split) whose neighbours the report keeps.
NEIGHBOUR_QUERIES = 2048
# Counts and confidence intervals: in metrics.json, not logged as training curves.
NOT_LOGGED = ("num_", "_ci95", "target_far")
_PAIR_CHUNK = 65536  # pairs scored at once: bounded memory for a learned head


@dataclass
class Neighbours:
    """A fixed-seed sample of queries with their nearest gallery items (own entry left out)."""

    queries: np.ndarray  # (C,) query rows
    ids: np.ndarray  # (C, k) gallery rows, nearest first
    distances: np.ndarray  # (C, k) their pair distances
    wrong: np.ndarray  # (C,) bool: the top-1 is of another class though the query has a match

    def pick(self, query_labels: np.ndarray, max_queries: int) -> np.ndarray:
        """Up to ``max_queries`` rows of this sample to show: the failures first (at most
        half the rows while there are correct ones), each part drawn across the classes."""
        labels = query_labels[self.queries]
        wrong = _across_classes(np.flatnonzero(self.wrong), labels)
        n_wrong = min(len(wrong), max(1, max_queries // 2))
        # The correct rows go on with the classes the failures did not show.
        right = _across_classes(np.flatnonzero(~self.wrong), labels, labels[wrong[:n_wrong]])
        n_right = min(len(right), max_queries - n_wrong)
        n_wrong = min(len(wrong), max_queries - n_right)
        return np.concatenate([wrong[:n_wrong], right[:n_right]])


@dataclass
class EvalReport:
    """What one evaluation of a split found: the numbers and what the pictures show."""

    metrics: dict[str, float]  # float64 values, as computed
    embeddings: np.ndarray  # (N, D) float32 query embeddings
    labels: np.ndarray  # (N,)
    gallery: np.ndarray | None  # (M, D), or None: leave-one-out over the queries
    gallery_labels: np.ndarray | None
    first: np.ndarray  # (P,) query rows of the verification pairs
    second: np.ndarray  # (P,)
    distances: np.ndarray  # (P,) their distances, lower means more alike
    same: np.ndarray  # (P,) bool
    neighbours: Neighbours | None  # None when no query can retrieve anything

    @property
    def threshold(self) -> float:
        """The verification threshold the report calibrated (and its pictures mark)."""
        return self.metrics["threshold"]

    def logged(self) -> dict[str, float]:
        """The metrics a training run logs: all but counts and confidence intervals."""
        return {k: v for k, v in self.metrics.items() if not any(t in k for t in NOT_LOGGED)}


class Evaluator:
    """Scores a split's embeddings: retrieval, verification, one-shot, and neighbours.

    Args:
        metric: how faiss searches the embeddings, "l2" or "ip" (normalised, for cosine).
        pair_distance: the model's distance of embedding pairs; None: euclidean for "l2",
            1 - inner product for "ip".
        episode_scorer: a learned head scoring one-shot episodes (see ``oneshot_metrics``).
        retrieval_scorer: a learned head ranking every gallery item (brute force) instead of
            the faiss metric (see ``scored_retrieval_metrics``).
        ks: the recall@k reported; those beyond the items a query can retrieve are left out.
        pairs: balanced verification pairs drawn from the split (``sample_pairs``).
        pairs_seed: their seed.
        target_far: None: the threshold of best accuracy; a rate: the threshold with a false
            accept rate at most this (and ``accuracy_at_threshold`` there).
        oneshot_ways: n-way one-shot tasks scored (ways the split cannot fill are left
            out); () for none.
        oneshot_shot, oneshot_episodes, oneshot_seed: their shots, episodes and seed.
    """

    def __init__(
        self,
        *,
        metric: str = "l2",
        pair_distance: PairDistance | None = None,
        episode_scorer: Scorer | None = None,
        retrieval_scorer: PairScorer | None = None,
        ks: Sequence[int] = (1, 5, 10),
        pairs: int = 50_000,
        pairs_seed: int = 0,
        target_far: float | None = None,
        oneshot_ways: Sequence[int] = (),
        oneshot_shot: int = 1,
        oneshot_episodes: int = 1000,
        oneshot_seed: int = 0,
    ) -> None:
        if metric not in METRICS:
            raise ConfigError(f"metric {metric!r} is not supported; expected one of {METRICS}")
        self.metric = metric
        self.pair_distance = pair_distance or _geometric(metric)
        self.episode_scorer = episode_scorer
        self.retrieval_scorer = retrieval_scorer
        self.ks = tuple(ks)
        self.pairs, self.pairs_seed = pairs, pairs_seed
        self.target_far = target_far
        self.oneshot_ways = tuple(oneshot_ways)
        self.oneshot_shot, self.oneshot_episodes = oneshot_shot, oneshot_episodes
        self.oneshot_seed = oneshot_seed

    def evaluate(
        self,
        query: Any,
        query_labels: Any,
        gallery: Any = None,
        gallery_labels: Any = None,
        *,
        groups: Any = None,
        index: faiss.Index | None = None,
    ) -> EvalReport:
        """Score ``query`` against ``gallery`` (None: leave-one-out over the queries).

        Args:
            query, query_labels, gallery, gallery_labels: as ``retrieval_metrics`` takes them.
            groups: (N,) one-shot group of each query (Omniglot's alphabets), or None.
            index: a faiss index over the gallery (``build_index``) to search; None: exact.
        """
        q = np.ascontiguousarray(to_numpy(query), dtype=np.float32)
        q_labels = to_numpy(query_labels)
        g = None if gallery is None else np.ascontiguousarray(to_numpy(gallery), np.float32)
        g_labels = None if gallery_labels is None else to_numpy(gallery_labels)
        retrievable = len(q) - 1 if g is None else len(g)
        ks = tuple(k for k in self.ks if k <= retrievable) or (1,)
        if self.retrieval_scorer is not None:
            scores = scored_retrieval_metrics(
                q, q_labels, g, g_labels, scorer=self.retrieval_scorer, ks=ks
            )
        else:
            searched = "flat" if index is None else index
            scores = retrieval_metrics(
                q, q_labels, g, g_labels, metric=self.metric, ks=ks, index=searched
            )
        # The data package's sampler (the training data's explicit pairs use it too),
        # imported here: siamese.data's package imports Lightning, which this one does not.
        from siamese.data.pairs import sample_pairs

        pairs = sample_pairs(torch.from_numpy(np.asarray(q_labels)), self.pairs, self.pairs_seed)
        first, second, same = pairs.first.numpy(), pairs.second.numpy(), pairs.same.numpy()
        dist = self._pair_distances(q[first], q[second])
        verification = verification_metrics(dist, same)
        if self.target_far is not None:
            threshold = threshold_at_far(dist, same, float(self.target_far))
            at = verification_metrics(dist, same, threshold=threshold)
            verification["threshold"] = threshold
            verification["threshold_target_far"] = float(self.target_far)
            verification["accuracy_at_threshold"] = at["accuracy_at_threshold"]
        metrics = {k: float(v) for k, v in {**scores, **verification}.items()}
        # Mean same/different pair distance: two lines that meet when the embedding collapses.
        metrics["pos_distance"] = float(dist[same].mean()) if same.any() else math.nan
        metrics["neg_distance"] = float(dist[~same].mean()) if (~same).any() else math.nan
        if self.oneshot_ways:
            shots = oneshot_metrics(
                q,
                q_labels,
                ways=self.oneshot_ways,
                k_shot=self.oneshot_shot,
                episodes=self.oneshot_episodes,
                seed=self.oneshot_seed,
                metric=self.metric,
                scorer=self.episode_scorer,
                groups=groups,
            )
            metrics.update({k: float(v) for k, v in shots.items()})
        neighbours = None
        if retrievable >= 1:
            neighbours = self._neighbours(q, q_labels, g, g_labels, index)
        return EvalReport(metrics, q, q_labels, g, g_labels, first, second, dist, same, neighbours)

    def _pair_distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = [
            np.asarray(self.pair_distance(a[s : s + _PAIR_CHUNK], b[s : s + _PAIR_CHUNK]))
            for s in range(0, len(a), _PAIR_CHUNK)
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _neighbours(
        self,
        q: np.ndarray,
        q_labels: np.ndarray,
        g: np.ndarray | None,
        g_labels: np.ndarray | None,
        index: faiss.Index | None,
    ) -> Neighbours:
        """The nearest gallery items of a fixed-seed sample of queries, by the faiss metric."""
        leave_one_out = g is None
        gallery, labels = (q, q_labels) if leave_one_out else (g, g_labels)
        k = min(MAX_TOP_K, len(gallery) - leave_one_out)
        rng = np.random.default_rng(0)
        queries = np.sort(rng.choice(len(q), min(NEIGHBOUR_QUERIES, len(q)), replace=False))
        if index is None:
            index = build_index(gallery, metric=self.metric)
        _, found = index.search(q[queries], k + leave_one_out)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for row, (own, hits) in enumerate(zip(queries, found, strict=True)):
            hits = hits[(hits >= 0) & ((hits != own) if leave_one_out else True)]
            ids[row] = hits[:k] if len(hits) >= k else np.resize(hits, k)
        dist = self._pair_distances(np.repeat(q[queries], k, axis=0), gallery[ids.reshape(-1)])
        counts = dict(zip(*np.unique(labels, return_counts=True), strict=True))
        matches = np.array([counts.get(y, 0) for y in q_labels[queries].tolist()])
        # A query whose class has no other gallery item cannot be right: not a failure.
        wrong = (labels[ids[:, 0]] != q_labels[queries]) & (matches > leave_one_out)
        return Neighbours(queries, ids, dist.reshape(ids.shape), wrong)

    @staticmethod
    def draw(
        report: EvalReport,
        *,
        images: Callable[[np.ndarray], Any] | None = None,
        gallery_images: Callable[[np.ndarray], Any] | None = None,
        class_names: Sequence[str] | None = None,
        max_queries: int = 8,
        top_k: int = 5,
        projection: str = "pca",
        max_points: int = 5000,
    ) -> dict[str, Figure]:
        """The report's figures: ``distances``, ``roc``, ``embeddings_2d``, and ``retrieval``
        when ``images`` reads the query rows' images ((n, C, H, W) in [0, 1]);
        ``gallery_images`` reads the gallery's (None: leave-one-out, ``images``). Each
        marks ``report.threshold``; ``class_names[label]`` names the classes. The figures
        depend on the report alone: ``Evaluator.draw(report)`` needs no evaluator."""
        from siamese.evaluation.plots import (
            distance_histograms_figure,
            embeddings_2d_figure,
            retrieval_grid_figure,
            roc_figure,
        )

        threshold = report.threshold if math.isfinite(report.threshold) else None
        names = _names(report.labels, class_names)
        figures = {
            "distances": distance_histograms_figure(
                report.distances, report.same, threshold=threshold
            ),
            "roc": roc_figure(report.distances, report.same, threshold=threshold),
            "embeddings_2d": embeddings_2d_figure(
                report.embeddings, names, method=projection, max_points=max_points, seed=0
            ),
        }
        nb = report.neighbours
        if images is None or nb is None:
            return figures
        rows = nb.pick(report.labels, max_queries)
        k = min(top_k, nb.ids.shape[1])
        queries, ids = nb.queries[rows], nb.ids[rows, :k]
        shown, slot = np.unique(ids, return_inverse=True)
        g_labels = report.labels if report.gallery_labels is None else report.gallery_labels
        read_gallery = images if gallery_images is None else gallery_images
        figures["retrieval"] = retrieval_grid_figure(
            _pixels(images(queries)),
            names[queries],
            _pixels(read_gallery(shown)),
            _names(g_labels, class_names)[shown],
            slot.reshape(ids.shape),
            max_queries=len(queries),
            distances=nb.distances[rows, :k],
            wrong=nb.wrong[rows],
        )
        return figures


def _across_classes(rows: np.ndarray, labels: np.ndarray, shown: Any = ()) -> np.ndarray:
    """``rows`` reordered so the classes take turns: each class's first row (classes in a
    fixed-seed order, those already ``shown`` last), then each class's second, and so on."""
    if len(rows) == 0:
        return rows
    classes, codes = np.unique(labels[rows], return_inverse=True)
    codes = codes.reshape(-1)
    turn = np.random.default_rng(0).permutation(len(classes))[codes]
    rank = np.isin(classes, np.asarray(shown)).astype(np.int64)[codes]  # had a turn already
    seen: dict[int, int] = {}
    for i, c in enumerate(codes.tolist()):
        seen[c] = seen.get(c, -1) + 1
        rank[i] += seen[c]
    return rows[np.lexsort((turn, rank))]


def _names(labels: np.ndarray, class_names: Sequence[str] | None) -> np.ndarray:
    """Class names of the labels where ``class_names`` names them all, else the labels."""
    y = np.asarray(labels)
    if class_names is not None and len(y) and 0 <= y.min() and y.max() < len(class_names):
        return np.asarray([str(c) for c in class_names], dtype=object)[y]
    return y


def _pixels(images: Any) -> np.ndarray:
    """Images as float32 in [0, 1] (augmentation or resampling may overshoot a little)."""
    return np.clip(to_numpy(images).astype(np.float32), 0.0, 1.0)


def _geometric(metric: str) -> PairDistance:
    """The pair distance of a faiss metric: euclidean for "l2", 1 - inner product for "ip"."""
    if metric == "l2":
        return lambda a, b: np.linalg.norm(a - b, axis=1)
    return lambda a, b: 1.0 - np.einsum("ij,ij->i", a, b)
