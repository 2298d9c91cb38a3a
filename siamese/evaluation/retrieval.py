"""Retrieval metrics: precision@1, recall@k, R-precision and MAP@R, by exact or faiss search.

Every query is ranked against a gallery (or, leave-one-out, against the rest of the query
set) by (distance, gallery index), so equal distances are broken the way a brute-force sort
breaks them. The exact search (``index="flat"``) lives in ``siamese.evaluation.exact_search``
with its design note; ``"ivf"`` and ``"hnsw"`` rank a faiss index's candidates
(``siamese.evaluation.index``). Memory grows with the gallery and with block_size * k,
never with N * N, and no (N, k) array is kept: each block of queries becomes per-query
metric values at once.

Conventions (those of metric learning: pytorch-metric-learning's AccuracyCalculator,
Musgrave et al. 2020):

- ``recall_at_k`` is 1 for a query with at least one same-class item among its top k, else
  0, averaged over queries: the "hit rate", not the share of the query's class found.
- R is the number of same-class gallery items of a query (its own entry excluded);
  ``r_precision`` is the share of them in the top R, ``map_at_r`` MAP@R. Queries with
  R = 0 are left out of every metric and counted in ``num_queries_without_positive``.
- Embeddings are scored in float32 (other dtypes are cast, float64 too). Rankings are
  exact for those float32 values: near-ties that float32 arithmetic cannot order are
  decided in float64 from the float32 embeddings.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from siamese.checks import check_int, check_k, check_ks, check_labels, label_kind
from siamese.errors import ConfigError, DataError
from siamese.evaluation.arrays import as_embeddings, to_numpy
from siamese.evaluation.exact_search import ExactSearch, Gallery, check_range
from siamese.evaluation.index import KINDS, METRICS, IndexSearch, build_index, index_kind

__all__ = ["PairScorer", "normalize", "retrieval_metrics", "scored_retrieval_metrics"]

ArrayLike = np.ndarray | torch.Tensor

# Blocks of queries an exact search works on at once (numpy uses one core per call).
_WORKERS = 2


def normalize(x: ArrayLike) -> np.ndarray:
    """L2-normalise each row, as float32; zero rows stay zero (like torch's F.normalize)."""
    x = to_numpy(x).astype(np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def retrieval_metrics(
    query: ArrayLike,
    query_labels: ArrayLike,
    gallery: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    *,
    metric: str = "l2",
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 4096,
    index: str | faiss.Index = "flat",
    index_params: Mapping[str, Any] | None = None,
    recall_sample: int = 1000,
) -> dict[str, float]:
    """Rank every query against the gallery and return a flat dict of retrieval metrics.

    Embeddings are cast to float32 and ranked exactly for those values (float64 decides
    what float32 arithmetic cannot order). ``recall_at_k`` follows the metric-learning
    convention: a query scores 1 when at least one same-class item is in its top k.

    Args:
        query: (N, D) embeddings (any real dtype; scored as float32).
        query_labels: (N,) class labels.
        gallery: (M, D) embeddings, or None to search each query against the other queries.
        gallery_labels: (M,) class labels; given exactly when ``gallery`` is.
        metric: "l2" (squared euclidean, smaller is closer) or "ip" (inner product, larger
            is closer; normalise the embeddings first for cosine).
        ks: the k of each ``recall_at_k``.
        block_size: queries searched at once (exact search works on two blocks at a time,
            in two threads); memory grows with block_size * k.
        index: "flat" (exact), "ivf" or "hnsw" (approximate, built here with
            ``build_index(gallery, **index_params)``), or an index already built over the
            gallery (the query set when leave-one-out) with ``build_index``. A passed index
            is only searched, never changed; a flat one is not even searched, since the
            exact ranking is computed from the arrays.
        index_params: keywords of ``build_index`` (nlist, nprobe, hnsw_m, ...) when
            ``index`` is a name.
        recall_sample: scored queries (fixed seed) on which an approximate index is compared
            with exact search.

    Returns:
        ``precision_at_1``, ``recall_at_<k>`` for each k (the share of queries with a
        same-class item in their top k), ``r_precision``, ``map_at_r`` (both over the top
        R, R the query's same-class gallery items), ``num_queries`` and
        ``num_queries_without_positive``; for an approximate index also
        ``approx_recall_at_10``, the fraction of the exact 10 nearest neighbours (own entry
        excluded) that it returns in its top 10, over ``recall_sample`` queries. Queries
        whose class has no other item in the gallery are left out of every metric and only
        counted.
    """
    if metric not in METRICS:
        raise ConfigError(
            f"metric {metric!r} is not supported; expected one of {METRICS} "
            "(normalise the embeddings and use 'ip' for cosine)"
        )
    check_int("block_size", block_size, 1, ", e.g. 4096")
    check_int("recall_sample", recall_sample, 1, ", e.g. 1000")
    ks, q32, g32, q_codes, g_codes, num_relevant = _split(
        query, query_labels, gallery, gallery_labels, ks
    )
    leave_one_out = gallery is None
    retrievable = len(g32) - leave_one_out

    gal = Gallery(g32, metric, g_codes)
    check_range(q32, gal)
    search = _searcher(index, index_params, gal, metric, leave_one_out)
    approximate = not isinstance(search, ExactSearch)

    # Queries without a positive count for nothing, so they are not searched at all.
    scored = np.flatnonzero(num_relevant > 0)
    top10 = min(10, retrievable)
    sample = np.array([], dtype=np.int64)
    if approximate:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(scored, size=min(recall_sample, len(scored)), replace=False))
        approx_top = np.empty((len(sample), top10), dtype=np.int64)

    def search_block(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = max(max(ks), int(num_relevant[rows].max()), top10 if approximate else 0)
        in_sample = np.isin(rows, sample)
        neighbours, relevant = search.top_k(
            q32[rows], k, rows if leave_one_out else None, q_codes[rows], in_sample
        )
        return rows, relevant, neighbours[in_sample, :top10]

    # Exact search spends most of its time in numpy, one core per call, so two blocks go
    # at once; faiss already uses every core.
    blocks = [scored[start : start + block_size] for start in range(0, len(scored), block_size)]
    workers = 1 if approximate else _WORKERS
    scores = _PerQueryScores.empty(len(q32), ks)
    for rows, relevant, top in _in_order(search_block, blocks, workers):
        scores.add(rows, relevant, num_relevant[rows])
        if approximate:
            approx_top[np.searchsorted(sample, rows[np.isin(rows, sample)])] = top

    out = scores.summary(num_queries=len(q32))
    if approximate:
        exact, _ = ExactSearch(gal).top_k(
            q32[sample],
            top10,
            sample if leave_one_out else None,
            q_codes[sample],
            np.ones(len(sample), dtype=bool),
        )
        hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx_top, exact, strict=True))
        out["approx_recall_at_10"] = hits / exact.size
    return out


# scorer(query rows (B, D), gallery (M, D)) -> (B, M) distances, lower = closer: a model's
# own pair score (a learned head) for every query-gallery pair.
PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
# Scores of (queries x gallery items) ranked at once by scored_retrieval_metrics (32 MB).
_SCORED_ELEMENTS = 1 << 22


def scored_retrieval_metrics(
    query: ArrayLike,
    query_labels: ArrayLike,
    gallery: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    *,
    scorer: PairScorer,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """:func:`retrieval_metrics` with every gallery item ranked by ``scorer`` (brute force).

    For a pair score no index can search, such as Koch et al.'s learned head: each block
    of queries is scored against the whole gallery and sorted by (score, gallery index),
    the order a brute-force sort gives, with the query's own entry left out when
    ``gallery`` is None. Costs N * M scores; memory grows with M, not N * M.

    Args:
        query, query_labels, gallery, gallery_labels, ks: as in :func:`retrieval_metrics`;
            the embeddings reach ``scorer`` as float32.
        scorer: ``(query rows (B, D), gallery (M, D)) -> (B, M)`` distances, lower = closer
            (negate a similarity); finite. Ranked as float64.

    Returns:
        The keys of :func:`retrieval_metrics` for an exact index; ``recall_at_k`` is the
        share of queries with at least one same-class item in their top k.
    """
    ks, q32, g32, q_codes, g_codes, num_relevant = _split(
        query, query_labels, gallery, gallery_labels, ks
    )
    leave_one_out = gallery is None
    m = len(g32)
    scored = np.flatnonzero(num_relevant > 0)
    step = max(1, _SCORED_ELEMENTS // m)
    scores = _PerQueryScores.empty(len(q32), ks)
    for start in range(0, len(scored), step):
        rows = scored[start : start + step]
        d = np.asarray(scorer(q32[rows], g32), dtype=np.float64)
        if d.shape != (len(rows), m):
            raise DataError(
                f"scorer returned shape {d.shape}; expected {(len(rows), m)} (queries, "
                "gallery items) distances"
            )
        if not np.isfinite(d).all():
            raise DataError(
                "scorer returned non-finite distances; the model's weights have probably "
                "diverged, so evaluate an earlier checkpoint"
            )
        order = np.argsort(d, axis=1, kind="stable")  # ties: the lower gallery index first
        if leave_one_out:
            order = order[order != rows[:, None]].reshape(len(rows), m - 1)
        k = max(max(ks), int(num_relevant[rows].max()))
        relevant = g_codes[order[:, :k]] == q_codes[rows][:, None]
        scores.add(rows, relevant, num_relevant[rows])
    return scores.summary(num_queries=len(q32))


def _in_order(
    fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
    blocks: list[np.ndarray],
    workers: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """fn of each block, in order, computed by up to ``workers`` threads at a time."""
    if workers == 1 or len(blocks) == 1:
        yield from map(fn, blocks)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for block in blocks:
            pending.append(pool.submit(fn, block))
            if len(pending) == workers:  # no more blocks in memory than threads
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class _PerQueryScores:
    """One value per scored query, summed at the end so block size cannot change a bit."""

    ks: tuple[int, ...]
    scored: np.ndarray  # (N,) bool: the query has at least one positive
    precision_at_1: np.ndarray  # (N,) float64, like the rest
    recall: dict[int, np.ndarray]  # k -> (N,)
    r_precision: np.ndarray
    map_at_r: np.ndarray

    @classmethod
    def empty(cls, n: int, ks: tuple[int, ...]) -> _PerQueryScores:
        return cls(
            ks=ks,
            scored=np.zeros(n, dtype=bool),
            precision_at_1=np.zeros(n),
            recall={k: np.zeros(n) for k in ks},
            r_precision=np.zeros(n),
            map_at_r=np.zeros(n),
        )

    def add(self, rows: np.ndarray, relevant: np.ndarray, r: np.ndarray) -> None:
        """Score a block: relevant (B, K) bool in rank order, r (B,) relevant items per query."""
        self.scored[rows] = True
        self.precision_at_1[rows] = relevant[:, 0]
        for k in self.ks:
            self.recall[k][rows] = relevant[:, :k].any(axis=1)
        # MAP@R (Musgrave et al. 2020): mean over ranks i <= R of precision@i at the relevant
        # ranks, divided by R. Hit counts are exact integers and cumsum adds left to right,
        # so each query's value is the same float whatever the block's K.
        within_r = relevant & (np.arange(relevant.shape[1]) < r[:, None])
        hits = np.cumsum(within_r, axis=1)
        precision = np.where(within_r, hits / np.arange(1, relevant.shape[1] + 1), 0.0)
        self.r_precision[rows] = hits[:, -1] / r
        self.map_at_r[rows] = np.cumsum(precision, axis=1)[:, -1] / r

    def summary(self, num_queries: int) -> dict[str, float]:
        n = int(self.scored.sum())

        def mean(values: np.ndarray) -> float:
            return math.fsum(values[self.scored]) / n

        out = {"precision_at_1": mean(self.precision_at_1)}
        out.update({f"recall_at_{k}": mean(self.recall[k]) for k in self.ks})
        out["r_precision"] = mean(self.r_precision)
        out["map_at_r"] = mean(self.map_at_r)
        out["num_queries"] = float(num_queries)
        out["num_queries_without_positive"] = float(num_queries - n)
        return out


def _searcher(
    index: str | faiss.Index,
    index_params: Mapping[str, Any] | None,
    gal: Gallery,
    metric: str,
    leave_one_out: bool,
) -> ExactSearch | IndexSearch:
    if isinstance(index, str):
        if index not in KINDS:
            raise ConfigError(
                f"index {index!r} is not supported; expected one of {KINDS} or a faiss "
                "index built with build_index over the gallery"
            )
        params = dict(index_params or {})
        if "metric" in params or "kind" in params:
            raise ConfigError(
                "index_params must not set 'metric' or 'kind'; pass them as "
                "retrieval_metrics(metric=..., index=...)"
            )
        if index == "flat":
            if params:
                raise ConfigError(
                    f"index_params {sorted(params)} do not apply to index='flat' (exact "
                    "search has no parameters); drop them or use index='ivf' or 'hnsw'"
                )
            return ExactSearch(gal)
        allowed = set(inspect.signature(build_index).parameters) - {"gallery", "metric", "kind"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(
                f"index_params {unknown} are not keywords of build_index; expected some of "
                f"{sorted(allowed)}"
            )
        return IndexSearch(build_index(gal.x, metric=metric, kind=index, **params), gal)

    if not isinstance(index, faiss.Index):
        raise ConfigError(
            f"index must be one of {KINDS} or a faiss.Index, not {type(index).__name__}"
        )
    if index_params:
        raise ConfigError(
            "index_params apply only when index is a name; the passed index is used as built"
        )
    if index.ntotal != gal.size or index.d != gal.dim:
        what = "the query set (leave-one-out)" if leave_one_out else "the gallery"
        raise ConfigError(
            f"the passed index holds {index.ntotal} vectors of dimension {index.d} but "
            f"{what} has {gal.size} of dimension {gal.dim}; build it with "
            "build_index over exactly those embeddings"
        )
    expected = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if index.metric_type != expected:
        raise ConfigError(
            f"the passed index does not search by metric={metric!r}; build it with "
            f"build_index(..., metric={metric!r})"
        )
    if index_kind(index) == "flat":
        return ExactSearch(gal)
    return IndexSearch(index, gal)


def _split(
    query: ArrayLike,
    query_labels: ArrayLike,
    gallery: ArrayLike | None,
    gallery_labels: ArrayLike | None,
    ks: Sequence[int],
) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked ks, float32 query and gallery, their class codes, and R (relevant gallery
    items) per query: the query's own entry excluded when ``gallery`` is None."""
    ks = check_ks(ks)
    if (gallery is None) != (gallery_labels is None):
        raise ConfigError(
            "gallery and gallery_labels must be given together: pass both for a separate "
            "gallery, or neither for leave-one-out"
        )

    leave_one_out = gallery is None
    q32 = as_embeddings(query, "query")
    q_labels, q_kind = _labels(query_labels, len(q32), "query")
    if gallery is None or gallery_labels is None:
        g32, g_labels = q32, q_labels
    else:
        g32 = as_embeddings(gallery, "gallery")
        g_labels, g_kind = _labels(gallery_labels, len(g32), "gallery")
        if q_kind != g_kind:
            raise DataError(
                f"query_labels are {q_kind}s ({q_labels.dtype}) but gallery_labels are "
                f"{g_kind}s ({g_labels.dtype}), and a number never names the class a string does; "
                "pass both as the same kind, e.g. both as class indices"
            )
        if g32.shape[1] != q32.shape[1]:
            raise DataError(
                f"gallery has dimension {g32.shape[1]} but query has {q32.shape[1]}; "
                "embed both with the same model"
            )

    retrievable = len(g32) - leave_one_out
    where = "the other queries (leave-one-out)" if leave_one_out else "the gallery"
    where = f"a query can retrieve from {where}"
    check_k(max(ks), retrievable, where=where, fix="lower ks or evaluate on more data")

    # Relevant items per query (R): same-class gallery items, the query itself excluded.
    _, codes = np.unique(np.concatenate([q_labels, g_labels]), return_inverse=True)
    q_codes, g_codes = codes[: len(q32)], codes[len(q32) :]
    num_relevant = np.bincount(g_codes, minlength=codes.max() + 1)[q_codes] - leave_one_out
    if not (num_relevant > 0).any():
        raise DataError(
            f"none of the {len(q32)} queries has another item of its class in the gallery, "
            "so retrieval metrics are undefined; check that query and gallery share classes"
        )
    return ks, q32, g32, q_codes, g_codes, num_relevant


def _labels(labels: ArrayLike, n: int, name: str) -> tuple[np.ndarray, str]:
    """``labels`` as a 1-D array of ``n`` class labels, and their kind (``label_kind``)."""
    arr = check_labels(to_numpy(labels), n, f"{name}_labels", of=name)
    return arr, label_kind(arr, f"{name}_labels")
