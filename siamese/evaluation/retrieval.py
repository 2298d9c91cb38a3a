"""Retrieval metrics: precision@1, recall@k, R-precision and MAP@R, by exact or faiss search.

Every query is ranked against a gallery (or, leave-one-out, against the rest of the query
set) by (distance, gallery index), so equal distances are broken the way a brute-force sort
breaks them. Candidates come with float32 keys whose error has a proven bound, either from
blocked matrix products (``index="flat"``: exact, with a proof that no other item ranks
in the top k) or from a faiss index (``"ivf"``, ``"hnsw"``: approximate, faiss's
candidates only). Where two candidates are too close for float32 to order them and their
order matters to a metric, they are ranked by float64 distances computed with element-wise
operations, so exact duplicates tie exactly and the result depends on neither float32
rounding, nor thread count, nor block size. Memory grows with the gallery and with
block_size * k, never with N * N, and no (N, k) array is kept: each block of queries
becomes per-query metric values at once.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import faiss
import numpy as np
import torch

from siamese.errors import ConfigError, DataError
from siamese.evaluation.arrays import as_embeddings, label_kind, to_numpy
from siamese.evaluation.index import KINDS, METRICS, build_index, index_kind

ArrayLike = np.ndarray | torch.Tensor

# float32 keys of (queries x gallery items) computed at once by the exact search (64 MB).
_TILE_ELEMENTS = 1 << 24
# (query, candidate) pairs x dimensions recomputed in float64 at once (512 kB: in cache).
_CHUNK_ELEMENTS = 1 << 16
# Gallery items sampled to guess how far the k-th neighbour is: see _ExactSearch.
_SAMPLE_MAX = 16384
_SAMPLE_MIN = 1024
# Keep at most this many candidates per query (plus 4 * k) before ranking them.
_EXTRA_CANDIDATES = 4096
# A key bound so loose that all candidates of a row land in one group: twice it is still a
# finite float32, above any difference of keys (_check_range), below inf - key (padding).
_NO_BOUND = float(np.finfo(np.float32).max) / 4
# Candidates asked of a faiss index past the k needed.
_EXTRA_INDEX_CANDIDATES = 8
# Blocks of queries an exact search works on at once (numpy uses one core per call).
_WORKERS = 2
# Padding of packed (key, index) candidates: sorts after every real one.
_PAD = np.uint64(np.iinfo(np.uint64).max)
_LOW_BITS = np.uint64(0xFFFFFFFF)


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

    Args:
        query: (N, D) embeddings.
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
        ``precision_at_1``, ``recall_at_<k>`` for each k, ``r_precision``, ``map_at_r``,
        ``num_queries`` and ``num_queries_without_positive``; for an approximate index also
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
    if isinstance(block_size, bool) or not isinstance(block_size, Integral) or block_size < 1:
        raise ConfigError(f"block_size {block_size!r} must be a positive integer, e.g. 4096")
    if isinstance(recall_sample, bool) or not isinstance(recall_sample, Integral):
        raise ConfigError(f"recall_sample {recall_sample!r} must be a positive integer")
    if recall_sample < 1:
        raise ConfigError(f"recall_sample {recall_sample!r} must be a positive integer")
    ks, q32, g32, q_codes, g_codes, num_relevant = _split(
        query, query_labels, gallery, gallery_labels, ks
    )
    leave_one_out = gallery is None
    retrievable = len(g32) - leave_one_out

    gal = _Gallery(g32, metric, g_codes)
    _check_range(q32, gal)
    search = _searcher(index, index_params, gal, metric, leave_one_out)
    approximate = not isinstance(search, _ExactSearch)

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
        exact, _ = _ExactSearch(gal).top_k(
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
        query, query_labels, gallery, gallery_labels, ks: as in :func:`retrieval_metrics`.
        scorer: ``(query rows (B, D), gallery (M, D)) -> (B, M)`` distances, lower = closer
            (negate a similarity); finite.

    Returns:
        The keys of :func:`retrieval_metrics` for an exact index.
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


class _Gallery:
    """The float32 gallery with what ranking needs: norms, float32 keys, float64 keys.

    The float32 key of (q, g) is |g|^2 / 2 - q.g for "l2" (the squared distance minus |q|^2,
    halved: the same order per query) and -q.g for "ip"; smaller is closer either way.
    """

    def __init__(self, x: np.ndarray, metric: str, codes: np.ndarray) -> None:
        self.x = x  # (N, D) float32, C-contiguous; never copied in float64
        self.metric = metric
        self.codes = codes.astype(np.int32)  # class codes 0..C-1
        self.size, self.dim = x.shape
        sq = np.concatenate([np.einsum("ij,ij->i", c, c) for c in _chunks(x)])
        self.norm = np.sqrt(sq)  # (N,) float64
        self.max_norm = float(self.norm.max())
        # Normalised embeddings: every norm within 0.1% of the largest, which then bounds
        # key errors nearly as tightly as each candidate's own norm, without looking it up.
        self.uniform = bool(self.norm.min() >= self.max_norm * (1 - 2.0**-10))
        self.half_sq = (sq / 2).astype(np.float32) if metric == "l2" else None
        # A float32 dot product of dim terms, summed in any order with or without FMA, is
        # within gamma_dim |q| |g| ~ dim * u |q| |g| of the exact one (u = 2^-24, Higham
        # 2002, 3.1); rounding |g|^2 / 2 to float32 and adding it cost 2 u (|g|^2 / 2) + u
        # |q| |g| more. (dim + 4) u (|q| |g| + |g|^2 / 2) bounds all of it.
        self.key_error = (self.dim + 4) * 2.0**-24
        # faiss's own float32 distances (|q|^2 + |g|^2 - 2 q.g, or summed differences): the
        # loose bound (dim + 8) eps32 (|q|^2 + |g|^2), as for faiss's inner products.
        self.faiss_error = (self.dim + 8) * float(np.finfo(np.float32).eps)
        # torch.from_numpy warns about read-only arrays (a memory-mapped .npy, say).
        use_torch = x.flags.writeable and _torch_matmul_is_ieee()
        self.torch_x = torch.from_numpy(x) if use_torch else None

    def tile_keys(self, neg_q: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        """float32 keys of the queries (passed negated, (B, D)) against items start:stop."""
        if self.torch_x is not None:  # the same float32 arithmetic, on both cores
            out_t = torch.from_numpy(out)
            torch.mm(torch.from_numpy(neg_q), self.torch_x[start:stop].T, out=out_t)
            if self.half_sq is not None:
                out_t.add_(torch.from_numpy(self.half_sq[start:stop]))
            return
        np.matmul(neg_q, self.x[start:stop].T, out=out)
        if self.half_sq is not None:
            np.add(out, self.half_sq[start:stop], out=out)

    def at_most(self, keys: np.ndarray, tau: np.ndarray, out: np.ndarray) -> np.ndarray:
        """keys <= tau[:, None] into ``out`` (bool, like keys)."""
        if self.torch_x is not None:
            torch.le(
                torch.from_numpy(keys), torch.from_numpy(tau[:, None]), out=torch.from_numpy(out)
            )
            return out
        return np.less_equal(keys, tau[:, None], out=out)

    def candidate_norms(self, cols: np.ndarray) -> np.ndarray:
        """(B,) the largest norm among each row's candidates (-1: none), or an upper bound."""
        if self.uniform:
            return np.full(len(cols), self.max_norm)
        return np.where(cols >= 0, self.norm[np.maximum(cols, 0)], 0.0).max(axis=1)

    def key_bound(self, q_norm: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(B,) bound on |float32 key - exact key| over each row's candidates (-1: none)."""
        g_norm = self.candidate_norms(cols)
        if self.metric == "l2":
            return self.key_error * (q_norm * g_norm + g_norm * g_norm / 2)
        return self.key_error * q_norm * g_norm

    def lowest_unseen_key(self, q_norm: np.ndarray, tau: np.ndarray) -> np.ndarray:
        """Lowest exact key that an item whose float32 key exceeds ``tau`` can have."""
        c = self.key_error
        if self.metric == "l2":
            # The key error is below c (|q| |g| + |g|^2 / 2) <= c (|q|^2 / 2 + |g|^2), and
            # |q - g|^2 = |q|^2 + 2 key >= |g|^2 / 2 - |q|^2 gives |g|^2 <= 4 |q|^2 + 4 key,
            # a bound by the query's norm, so one far-out gallery row cannot loosen all rows.
            return (tau - 4.5 * c * q_norm * q_norm) / (1 + 4 * c)
        return tau - c * q_norm * self.max_norm

    def exact_keys(self, q: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """float64 keys (squared L2, or minus the inner product) of pairs (q[rows], x[cols]).

        float64 holds every difference and product of float32 values exactly, so only the
        sum rounds. It is summed as a fixed pairwise tree ((t0 + t1) + (t2 + t3)) + ... of
        element-wise additions, so every pair goes through the same float operations on its
        own values, wherever it sits in the chunk: two identical gallery rows get
        bit-identical keys, and exact duplicates really tie.
        """
        out = np.empty(len(rows))
        width = 1 << (self.dim - 1).bit_length()  # zero-padded to a power of two
        step = max(1, _CHUNK_ELEMENTS // width)
        terms = np.zeros((min(step, len(rows)), width))  # the padding stays 0 * 0 = 0
        sums = [np.empty(terms.size // 2), np.empty(terms.size // 4)]  # ping-pong levels
        for s in range(0, len(rows), step):
            n = len(rows[s : s + step])
            chunk = terms[:n, : self.dim]
            gathered = self.x[cols[s : s + step]]
            # dtype=float64: numpy would otherwise compute float32 - float32 in float32.
            if self.metric == "l2":
                np.subtract(q[rows[s : s + step]], gathered, out=chunk, dtype=np.float64)
                np.multiply(chunk, chunk, out=chunk)
            else:
                np.multiply(q[rows[s : s + step]], gathered, out=chunk, dtype=np.float64)
                np.negative(chunk, out=chunk)
            # Adjacent pairs of the flat (n, width) array never straddle two rows: 1-D
            # strided additions, much faster than additions of 2-D column slices.
            level = terms[:n].ravel()
            depth = 0
            while len(level) > n:
                half = sums[depth % 2][: len(level) // 2]
                np.add(level[0::2], level[1::2], out=half)
                level, depth = half, depth + 1
            out[s : s + step] = level
        return out


def _torch_matmul_is_ieee() -> bool:
    """Whether torch multiplies float32 matrices in float32 (no TF32/bfloat16 shortcuts)."""
    settings = [torch.get_float32_matmul_precision() == "highest"]
    mkldnn = getattr(torch.backends, "mkldnn", None)
    for holder in (torch.backends, getattr(mkldnn, "matmul", None)):
        if holder is not None and hasattr(holder, "fp32_precision"):
            settings.append(holder.fp32_precision in ("none", "ieee"))
    return all(settings)


def _check_range(q32: np.ndarray, gal: _Gallery) -> None:
    """float32 keys and their partial sums must stay finite."""
    q_max = float(np.sqrt(max(np.einsum("ij,ij->i", q, q).max() for q in _chunks(q32))))
    if q_max * gal.max_norm + gal.max_norm**2 > 1e37:
        raise DataError(
            "embeddings are so large that their float32 distances overflow; "
            "normalise or rescale them before evaluating"
        )


def _chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    """float64 copies of consecutive row chunks of x, one at a time."""
    step = max(1, _CHUNK_ELEMENTS // x.shape[1])
    for s in range(0, len(x), step):
        yield x[s : s + step].astype(np.float64)


def _rank(
    gal: _Gallery,
    q: np.ndarray,
    cols: np.ndarray,
    keys: np.ndarray,
    bound: Callable[[np.ndarray], np.ndarray],
    k: int,
    q_codes: np.ndarray,
    ids_exact: np.ndarray,
    complete: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first k of each row in exact (key, index) order, as far as the metrics can tell,
    whether each is of the query's class, and whether the row could be ranked: (B, k)
    indices (-1: none), (B, k) bool and (B,) bool.

    ``cols`` (B, C) are candidates sorted by float32 ``keys`` (padded with -1 and inf), and
    the first k of the exact order are among them; ``bound(cols[:, :w])`` is (B,) bounds on
    how far the float32 key of each of those candidates is from its exact key.
    Where consecutive keys are more than 2 * bound apart the order is certain, which cuts
    a row into groups. A group is re-ranked by float64 keys only if it starts within the
    first k and holds both same-class and other-class items (else its order changes no
    metric), or, for rows in ``ids_exact``, whatever it holds. A row whose ``complete`` is
    False has more candidates than ``cols`` shows; if the group that holds rank k runs on
    past them, the row cannot be ranked here.
    """
    if cols.shape[1] < k + 1:
        pad = k + 1 - cols.shape[1]
        cols = np.pad(cols, ((0, 0), (0, pad)), constant_values=-1)
        keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=np.inf)
    # Only the groups up to the one that holds rank k matter; look a little past rank k and
    # widen the window for the rare row whose group runs on.
    width = min(cols.shape[1], k + 32)
    while True:
        # float32 differences round by at most 2^-24 of themselves: a slack 2^-20 wider
        # (then rounded to float32) can only call more pairs tied, never fewer.
        slack = (2 * (1 + 2.0**-20) * bound(cols[:, :width])).astype(np.float32)
        with np.errstate(invalid="ignore"):  # inf - inf (padding): nan, a cut, as it should
            tied = np.diff(keys[:, :width], axis=1) <= slack[:, None]
        runs_on = tied[:, k - 1 :].all(axis=1)
        if width == cols.shape[1] or not runs_on.any():
            break
        width = min(cols.shape[1], 2 * width)
    ranked = ~runs_on | (width < cols.shape[1])
    if complete is not None:
        ranked |= complete
    cols = cols[:, :width]  # re-ranked in place: callers pass arrays of their own
    n_rows = len(cols)
    same = (cols >= 0) & (gal.codes[np.maximum(cols, 0)] == q_codes[:, None])
    group = np.zeros((n_rows, width), dtype=np.int32)
    np.cumsum(~tied, axis=1, out=group[:, 1:])
    last = group[:, k - 1]  # the group that holds rank k
    flagged = np.zeros((n_rows, width), dtype=bool)
    pair_rows, pair_cols = np.nonzero(tied & (same[:, 1:] != same[:, :-1]))
    pair_groups = group[pair_rows, pair_cols]
    keep = pair_groups <= last[pair_rows]
    flagged[pair_rows[keep], pair_groups[keep]] = True
    if ids_exact.any():
        flagged[ids_exact] |= np.arange(width) <= last[ids_exact, None]
    resolve = np.take_along_axis(flagged, group, axis=1)
    resolve[:, :-1] &= tied  # a group of one needs no ranking
    resolve[:, 1:] |= resolve[:, :-1] & tied
    rows, pos = np.nonzero(resolve)
    if len(rows):
        cand = cols[rows, pos]
        exact = gal.exact_keys(q, rows, cand)
        # Positions of a group are consecutive, so sorting by (row, group, key, index)
        # and writing back in place orders each group and nothing else.
        order = _sort_within_groups(rows * width + group[rows, pos], exact, cand)
        cols[rows, pos] = cand[order]
        same[rows, pos] = same[rows, pos][order]
    return cols[:, :k], same[:, :k], ranked


def _sort_within_groups(group: np.ndarray, key: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The order of np.lexsort((index, key, group)), for ``group`` already sorted."""
    order = np.argsort(key)
    order = order[np.argsort(group[order], kind="stable")]
    g, k = group[order], key[order]
    if ((g[1:] == g[:-1]) & (k[1:] == k[:-1])).any():  # equal keys (duplicates): by index
        return np.lexsort((index, key, group))
    return order


class _ExactSearch:
    """Exact top-k by blocked float32 matrix products, proven and tie-broken by _rank.

    Each query's k-th key is guessed from a fixed random sample of the gallery, and every
    item whose float32 key is below the guess becomes a candidate. A row is accepted when
    the guess was high enough to prove that no other item can rank in its top k; the few
    rows where it was not are searched again with a higher guess, and then with every item.
    """

    def __init__(self, gal: _Gallery) -> None:
        self.gal = gal
        # A prefix of a random permutation is a random sample, whatever its length.
        self.sample_ids = np.random.default_rng(0).permutation(gal.size)[:_SAMPLE_MAX]
        self.sample = _Gallery(
            np.ascontiguousarray(gal.x[self.sample_ids]), gal.metric, gal.codes[self.sample_ids]
        )
        self.sample_pos = np.full(gal.size, -1, dtype=np.int64)  # gallery id -> position
        self.sample_pos[self.sample_ids] = np.arange(len(self.sample_ids))
        self.local = threading.local()  # scratch arrays, one set per thread

    def top_k(
        self,
        q: np.ndarray,
        k: int,
        self_ids: np.ndarray | None,
        q_codes: np.ndarray,
        ids_exact: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) gallery indices nearest each query (``self_ids`` never appear) and whether
        each is of the query's class."""
        neg_q = -q
        q64 = q.astype(np.float64)
        q_norm = np.sqrt(np.einsum("ij,ij->i", q64, q64))
        guesses = self._guess_thresholds(neg_q, k, self_ids)
        out = np.empty((len(q), k), dtype=np.int64)
        same = np.empty((len(q), k), dtype=bool)
        todo = np.arange(len(q))
        for tau in guesses:
            tau = tau[todo]
            ids = None if self_ids is None else self_ids[todo]
            # With every item a candidate (the last try) the rows are long: fewer at once.
            step = len(todo) if np.isfinite(tau).all() else _TILE_ELEMENTS // 4 // self.gal.size
            step = max(1, step)
            failed = []
            for s in range(0, len(todo), step):
                rows = todo[s : s + step]
                part = slice(s, s + step)
                packed, count, tau_used = self._candidates(
                    neg_q[rows], tau[part], k, None if ids is None else ids[part]
                )
                # Unpack what ranking the first k needs as a rule; the rest only on demand.
                cols, keys = _unpack(packed[:, : k + 64])
                bound = self.gal.key_bound(q_norm[rows], cols[:, :k])
                with np.errstate(invalid="ignore"):  # inf - inf: fewer than k candidates
                    low = self.gal.lowest_unseen_key(q_norm[rows], tau_used)
                    proven = (keys[:, k - 1] + bound < low) | ~np.isfinite(tau_used)
                ok = np.flatnonzero(proven)
                norms = q_norm[rows[ok]]
                ranked_cols, ranked_same, ranked = _rank(
                    self.gal, q[rows[ok]], cols[ok], keys[ok],
                    lambda c, norms=norms: self.gal.key_bound(norms, c), k,
                    q_codes[rows[ok]], ids_exact[rows[ok]], count[ok] <= cols.shape[1],
                )  # fmt: skip
                out[rows[ok]], same[rows[ok]] = ranked_cols, ranked_same
                again = ok[~ranked]  # a tie ran past the unpacked columns
                if len(again):
                    cols, keys = _unpack(packed[again])
                    norms = q_norm[rows[again]]
                    out[rows[again]], same[rows[again]], _ = _rank(
                        self.gal, q[rows[again]], cols, keys,
                        lambda c, norms=norms: self.gal.key_bound(norms, c), k,
                        q_codes[rows[again]], ids_exact[rows[again]],
                    )  # fmt: skip
                failed.append(rows[~proven])
            todo = np.concatenate(failed)
            if len(todo) == 0:
                break
        assert len(todo) == 0, "the last guess takes every item, which always proves"
        return out, same

    def _guess_thresholds(
        self, neg_q: np.ndarray, k: int, self_ids: np.ndarray | None
    ) -> list[np.ndarray]:
        """(B,) float32 keys about 1.4 k and 2.5 k items deep, then inf (every item)."""
        n = self.gal.size - (self_ids is not None)
        every = np.full(len(neg_q), np.inf, dtype=np.float32)
        m = min(self.sample.size, max(_SAMPLE_MIN, math.ceil(32 * n / k)))
        expected = k * m / n  # sample items among the true top k
        near = math.ceil(expected + 2 * math.sqrt(expected) + 2)
        far = math.ceil(2 * expected + 6 * math.sqrt(expected) + 8)
        if far >= m - 1:
            return [every]
        guesses = [np.empty(len(neg_q), dtype=np.float32) for _ in range(2)]
        step = max(1, _TILE_ELEMENTS // m)
        for s in range(0, len(neg_q), step):
            rows = neg_q[s : s + step]
            keys = self._buffer("sample", (len(rows), m), np.float32)
            self.sample.tile_keys(rows, 0, m, keys)
            if self_ids is not None:
                pos = self.sample_pos[self_ids[s : s + step]]
                own = np.flatnonzero((pos >= 0) & (pos < m))
                keys[own, pos[own]] = np.inf
            keys.partition(far - 1, axis=1)
            nearest = keys[:, :far]
            guesses[1][s : s + step] = nearest[:, far - 1]
            guesses[0][s : s + step] = np.partition(nearest, near - 1, axis=1)[:, near - 1]
        return [*guesses, every]

    def _candidates(
        self, neg_q: np.ndarray, tau: np.ndarray, k: int, self_ids: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Items with float32 key <= tau (every item where tau is inf): (B, C) packed
        (key, index) per row in order (see _pack; at least k columns, padded), (B,) how many
        each row has, and tau.

        A row with far more candidates than needed has its tau lowered (and the returned
        tau says so), so a loose guess cannot blow up memory.
        """
        n_rows = len(neg_q)
        n = self.gal.size
        # An own entry is set to inf, so it is never <= a finite threshold.
        limit = np.where(np.isfinite(tau), tau, np.finfo(np.float32).max)
        width = max(8, min(n, _TILE_ELEMENTS // n_rows))
        fill = np.zeros(n_rows, dtype=np.int64)
        pieces = []
        for start in range(0, n, width):
            stop = min(n, start + width)
            w = stop - start
            tile = self._buffer("tile", (n_rows, w), np.float32)
            self.gal.tile_keys(neg_q, start, stop, tile)
            if self_ids is not None:
                own = np.flatnonzero((self_ids >= start) & (self_ids < stop))
                tile[own, self_ids[own] - start] = np.inf
            mask = self._buffer("mask", (n_rows, w), np.bool_)
            flat = np.flatnonzero(self.gal.at_most(tile, limit, out=mask))
            row = flat // w
            counts = np.bincount(row, minlength=n_rows)
            dest = np.arange(len(flat)) + (fill - (np.cumsum(counts) - counts))[row]
            fill += counts
            col = (flat - row * w + start).astype(np.uint64)
            pieces.append((row, dest, _pack(tile.ravel()[flat], col)))

        # (key, index) packed into one uint64 per candidate: one plain sort orders a row.
        width = max(k, int(fill.max()))
        packed = self._buffer("packed", (n_rows, width), np.uint64)
        packed.fill(_PAD)
        for row, dest, value in pieces:
            packed.ravel()[row * width + dest] = value
        del pieces
        packed.sort(axis=1)

        cap = 4 * k + _EXTRA_CANDIDATES
        if width > cap and np.isfinite(tau).all():
            # Keep keys up to the cap-th (all of its ties), and say so in tau.
            crowded = fill > cap
            tau = tau.copy()
            tau[crowded] = _unpack(packed[crowded, cap - 1 : cap])[1][:, 0]
            packed[packed > (packed[:, [cap - 1]] | _LOW_BITS)] = _PAD
            fill = (packed != _PAD).sum(axis=1)
            packed = packed[:, : max(k, int(fill.max()))]
        return packed, fill, tau

    def _buffer(self, name: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
        """A reused scratch array: fresh large arrays cost a page fault per 4 kB."""
        size = shape[0] * shape[1]
        buffers = self.local.__dict__
        buf = buffers.get(name)
        if buf is None or buf.size < size:
            buf = buffers[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


def _pack(keys: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float32 keys and indices -> uint64 ordered like (key, index): the key's bits, made
    to sort as unsigned integers, above the index."""
    bits = keys.view(np.uint32)
    flip = np.where(bits >> 31 == 1, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    return ((bits ^ flip).astype(np.uint64) << np.uint64(32)) | cols


def _unpack(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, float32 keys) back from _pack; padding becomes (-1, inf)."""
    cols = (packed & _LOW_BITS).view(np.int64)
    pad = packed == _PAD
    bits = (packed >> np.uint64(32)).astype(np.uint32)
    flip = np.where(bits >> 31 == 1, np.uint32(0x80000000), np.uint32(0xFFFFFFFF))
    keys = (bits ^ flip).view(np.float32)
    cols[pad] = -1
    keys[pad] = np.inf
    return cols, keys


class _IndexSearch:
    """Top-k from a faiss index's candidates, re-ranked by exact keys (approximate)."""

    def __init__(self, index: faiss.Index, gal: _Gallery) -> None:
        self.index = index
        self.gal = gal
        # The indexes build_index makes compute float32 distances from the stored vectors
        # (within the key bound); any other (a compressed one) gets no bound at all.
        self.kind = index_kind(index)
        self.trusted = self.kind in KINDS

    def top_k(
        self,
        q: np.ndarray,
        k: int,
        self_ids: np.ndarray | None,
        q_codes: np.ndarray,
        ids_exact: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) gallery indices (-1 where the index found fewer than k) and whether each
        is of the query's class."""
        # A few candidates past rank k, so that float32 rounding at the cut-off cannot keep
        # out an item that exact keys rank within k.
        wanted = min(k + (self_ids is not None) + _EXTRA_INDEX_CANDIDATES, self.gal.size)
        if self.kind == "hnsw":
            # HNSW finds at most efSearch items: widen it for this search only (the index
            # itself is left as it is).
            ef = max(faiss.downcast_index(self.index).hnsw.efSearch, wanted)
            params = faiss.SearchParametersHNSW(efSearch=ef)
            distances, ids = self.index.search(q, wanted, params=params)
        else:
            distances, ids = self.index.search(q, wanted)
        valid = ids >= 0
        if self_ids is not None:
            valid &= ids != self_ids[:, None]
        keys = distances if self.gal.metric == "l2" else -distances
        # Invalid entries (the query itself, -1 for not found) go last.
        invalid = (~valid).sum(axis=1)
        if (invalid == invalid[0]).all():  # as a rule one (the query) or none in each row
            width = ids.shape[1] - invalid[0]
            cols = ids[valid].reshape(len(ids), width)
            keys = keys[valid].reshape(len(ids), width)
        else:
            order = np.argsort(~valid, axis=1, kind="stable")
            keys = np.take_along_axis(np.where(valid, keys, np.inf), order, axis=1)
            cols = np.take_along_axis(np.where(valid, ids, -1), order, axis=1)
        # faiss lists its results by distance, but check.
        with np.errstate(invalid="ignore"):
            unsorted = np.flatnonzero((np.diff(keys, axis=1) < 0).any(axis=1))
        if len(unsorted):
            resort = np.argsort(keys[unsorted], axis=1, kind="stable")
            keys[unsorted] = np.take_along_axis(keys[unsorted], resort, axis=1)
            cols[unsorted] = np.take_along_axis(cols[unsorted], resort, axis=1)
        q64 = q.astype(np.float64)
        q_norm = np.sqrt(np.einsum("ij,ij->i", q64, q64))
        cols, same, _ = _rank(
            self.gal, q, cols, keys, lambda c: self._bound(q_norm, c), k, q_codes, ids_exact
        )  # every candidate is in cols, so every row is ranked
        return cols, same

    def _bound(self, q_norm: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(B,) bound on the error of faiss's float32 distances to these candidates."""
        if not self.trusted:
            return np.full(len(q_norm), _NO_BOUND)
        g_norm = self.gal.candidate_norms(cols)
        if self.gal.metric == "l2":
            return self.gal.faiss_error * (q_norm * q_norm + g_norm * g_norm)
        return self.gal.faiss_error * q_norm * g_norm


def _searcher(
    index: str | faiss.Index,
    index_params: Mapping[str, Any] | None,
    gal: _Gallery,
    metric: str,
    leave_one_out: bool,
) -> _ExactSearch | _IndexSearch:
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
            return _ExactSearch(gal)
        allowed = set(inspect.signature(build_index).parameters) - {"gallery", "metric", "kind"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(
                f"index_params {unknown} are not keywords of build_index; expected some of "
                f"{sorted(allowed)}"
            )
        return _IndexSearch(build_index(gal.x, metric=metric, kind=index, **params), gal)

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
        return _ExactSearch(gal)
    return _IndexSearch(index, gal)


def _split(
    query: ArrayLike,
    query_labels: ArrayLike,
    gallery: ArrayLike | None,
    gallery_labels: ArrayLike | None,
    ks: Sequence[int],
) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked ks, float32 query and gallery, their class codes, and R (relevant gallery
    items) per query: the query's own entry excluded when ``gallery`` is None."""
    ks = _check_ks(ks)
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
    if max(ks) > retrievable:
        where = "the other queries (leave-one-out)" if leave_one_out else "the gallery"
        raise ConfigError(
            f"k={max(ks)} is larger than the {retrievable} items a query can retrieve from "
            f"{where}; lower ks or evaluate on more data"
        )

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
    arr = to_numpy(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(
            f"{name}_labels has shape {tuple(arr.shape)} but {name} has {n} rows; "
            "pass one label per embedding as a 1-D array"
        )
    return arr, label_kind(arr, f"{name}_labels")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    values = tuple(ks) if isinstance(ks, Sequence) else ()
    if not values or any(
        isinstance(k, bool) or not isinstance(k, Integral) or k < 1 for k in values
    ):
        raise ConfigError(f"ks {ks!r} must be a non-empty sequence of positive integers")
    return tuple(sorted({int(k) for k in values}))
