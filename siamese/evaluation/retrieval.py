"""Retrieval metrics by exact faiss search: precision@1, recall@k, R-precision and MAP@R.

Every query is ranked against a gallery (or, leave-one-out, against the rest of the query
set) by (distance, gallery index), so equal distances are broken the same way a brute-force
sort would break them. faiss proposes candidates; the ranking itself uses float64 distances
recomputed here, so exact duplicates tie exactly and the result never depends on faiss's
float32 rounding, its thread count or the block size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import faiss
import numpy as np
import torch

from siamese.errors import ConfigError, DataError

ArrayLike = np.ndarray | torch.Tensor

METRICS = ("l2", "ip")

# Elements of a (rows, candidates) float64 array handled at once when recomputing distances:
# small enough to stay in cache across the loop over dimensions.
_CHUNK_ELEMENTS = 1 << 16


def normalize(x: ArrayLike) -> np.ndarray:
    """L2-normalise each row, as float32; zero rows stay zero (like torch's F.normalize)."""
    x = _to_numpy(x).astype(np.float32)
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
        block_size: queries searched at once; memory grows with block_size * k.

    Returns:
        ``precision_at_1``, ``recall_at_<k>`` for each k, ``r_precision``, ``map_at_r``,
        ``num_queries`` and ``num_queries_without_positive``. Queries whose class has no
        other item in the gallery are left out of every metric and only counted.
    """
    ks = _check_ks(ks)
    if metric not in METRICS:
        raise ConfigError(
            f"metric {metric!r} is not supported; expected one of {METRICS} "
            "(normalise the embeddings and use 'ip' for cosine)"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, Integral) or block_size < 1:
        raise ConfigError(f"block_size {block_size!r} must be a positive integer, e.g. 4096")
    if (gallery is None) != (gallery_labels is None):
        raise ConfigError(
            "gallery and gallery_labels must be given together: pass both for a separate "
            "gallery, or neither for leave-one-out"
        )

    leave_one_out = gallery is None
    q32, q64 = _embeddings(query, "query")
    q_labels = _labels(query_labels, len(q32), "query")
    if gallery is None or gallery_labels is None:
        g32, g64, g_labels = q32, q64, q_labels
    else:
        g32, g64 = _embeddings(gallery, "gallery")
        g_labels = _labels(gallery_labels, len(g32), "gallery")
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

    search = _ExactSearch(g32, g64, metric)
    scores = _PerQueryScores.empty(len(q32), ks)
    for start in range(0, len(q32), block_size):
        rows = np.arange(start, min(start + block_size, len(q32)))
        # Queries without a positive count for nothing, so they are not searched at all.
        rows = rows[num_relevant[rows] > 0]
        if len(rows) == 0:
            continue
        r = num_relevant[rows]
        k = max(max(ks), int(r.max()))
        neighbours = search.top_k(q32[rows], q64[rows], k, rows if leave_one_out else None)
        scores.add(rows, g_codes[neighbours] == q_codes[rows, None], r)
    return scores.summary(num_queries=len(q32))


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
        # ranks, divided by R. Accumulated column by column so each query's value comes from
        # the same float operations whatever the block's K.
        hits = np.zeros(len(rows))
        average_precision = np.zeros(len(rows))
        for i in range(relevant.shape[1]):
            rel_i = relevant[:, i] & (i < r)
            hits += rel_i
            average_precision += np.where(rel_i, hits / (i + 1), 0.0)
        self.r_precision[rows] = hits / r
        self.map_at_r[rows] = average_precision / r

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


class _ExactSearch:
    """Top-k by (float64 distance, gallery index): faiss finds candidates, numpy ranks them."""

    def __init__(self, g32: np.ndarray, g64: np.ndarray, metric: str) -> None:
        self.metric = metric
        self.size, dim = g32.shape
        self.index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        self.index.add(g32)
        self.columns = np.ascontiguousarray(g64.T)  # (D, M): one gallery coordinate per row
        # faiss computes in float32 (for many queries as |q|^2 + |g|^2 - 2 q.g with BLAS);
        # its error is below (dim + 8) * eps32 * (|q|^2 + |g|^2), a loose worst-case bound
        # for a sum of dim terms plus rounding the input to float32.
        self.rel_error = (dim + 8) * float(np.finfo(np.float32).eps)
        self.max_gallery_norm = float(np.sqrt((g64 * g64).sum(axis=1).max()))

    def top_k(
        self, q32: np.ndarray, q64: np.ndarray, k: int, self_ids: np.ndarray | None
    ) -> np.ndarray:
        """(B, k) gallery indices nearest each query; ``self_ids`` are dropped (leave-one-out)."""
        need = k + (self_ids is not None)
        # Extra candidates past the k-th give the gap that proves nothing unseen ranks higher.
        n_candidates = min(need + max(8, need // 4), self.size)
        distances, idx = self.index.search(q32, n_candidates)
        if not np.isfinite(distances).all():
            raise DataError(
                "embeddings are so large that their float32 distances overflow; "
                "normalise or rescale them before evaluating"
            )
        faiss_keys = distances if self.metric == "l2" else -distances
        keys = self._keys(q64, idx)
        idx, keys = _sort_by_key_then_index(idx, keys)

        # A gallery item faiss did not return has a faiss key >= the largest one it returned;
        # if even the lowest exact key that allows is above our k-th key, the top k is exact.
        # Otherwise (ties or near-ties at the boundary) rank that query against everything.
        if n_candidates < self.size:
            unseen_low = self._lowest_exact_key(faiss_keys.max(axis=1), q64)
            unsure = np.flatnonzero(unseen_low <= keys[:, need - 1])
            if len(unsure):
                idx = idx[:, :need].copy()
                idx[unsure] = self._full_top(q64[unsure], need)
        idx = idx[:, :need]

        if self_ids is None:
            return idx
        # Drop the query's own index wherever it ranks; a duplicate can tie with it, so it
        # need not be first, and if it fell past the cut-off the last entry goes instead.
        keep = idx != self_ids[:, None]
        keep[keep.all(axis=1), -1] = False
        return idx[keep].reshape(len(idx), k)

    def _lowest_exact_key(self, faiss_key: np.ndarray, q64: np.ndarray) -> np.ndarray:
        """Smallest exact key a gallery item with faiss key >= ``faiss_key`` can have."""
        q_sq = (q64 * q64).sum(axis=1)
        c = self.rel_error
        if self.metric == "l2":
            # |f - e| <= c (|q|^2 + |g|^2) with |g|^2 <= 2 |q|^2 + 2 e bounds e from below
            # by the query's norm alone, so one far-out gallery row cannot loosen every query.
            return (faiss_key - 3 * c * q_sq) / (1 + 2 * c)
        return faiss_key - c * np.sqrt(q_sq) * self.max_gallery_norm

    def _full_top(self, q64: np.ndarray, need: int) -> np.ndarray:
        """Exact (key, index) top ``need`` over the whole gallery, a few queries at a time."""
        out = np.empty((len(q64), need), dtype=np.int64)
        step = max(1, _CHUNK_ELEMENTS // self.size)
        for s in range(0, len(q64), step):
            keys = self._keys(q64[s : s + step], None)
            # Columns are already in index order, so a stable sort breaks ties by index.
            out[s : s + step] = np.argsort(keys, axis=1, kind="stable")[:, :need]
        return out

    def _keys(self, q64: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
        """Float64 ranking keys (squared L2, or minus the inner product), smaller = closer.

        Keys of query b against gallery items ``idx[b]``, or against the whole gallery when
        ``idx`` is None. Summing one dimension at a time with element-wise operations means
        two identical gallery rows get bit-identical keys, so exact duplicates really tie.
        """
        n_cols = self.size if idx is None else idx.shape[1]
        keys = np.empty((len(q64), n_cols))
        step = max(1, _CHUNK_ELEMENTS // n_cols)
        for s in range(0, len(q64), step):
            q = q64[s : s + step]
            acc = keys[s : s + step]
            acc[:] = 0.0
            buf = np.empty_like(acc)
            for d in range(q.shape[1]):
                if idx is None:
                    buf[:] = self.columns[d]
                else:
                    # faiss returned valid indices only; "clip" skips a slow bounds check.
                    np.take(self.columns[d], idx[s : s + step], out=buf, mode="clip")
                if self.metric == "l2":
                    np.subtract(q[:, d, None], buf, out=buf)
                    np.multiply(buf, buf, out=buf)
                    acc += buf
                else:
                    np.multiply(q[:, d, None], buf, out=buf)
                    acc -= buf
        return keys


def _sort_by_key_then_index(idx: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (key, index), the order a brute-force ranking uses."""
    order = np.lexsort((idx, keys), axis=-1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(keys, order, 1)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16; float32 holds bfloat16 and float16 exactly.
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _embeddings(x: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 contiguous for faiss, float64 for exact ranking) after checking the values."""
    arr = _to_numpy(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(
            f"{name} has shape {tuple(arr.shape)}; expected a non-empty 2-D array (N, D) "
            "of embeddings, one row per item"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{name} has dtype {arr.dtype}; expected real-valued embeddings")
    x32 = np.ascontiguousarray(arr, dtype=np.float32)
    bad = int((~np.isfinite(x32)).sum())
    if bad:
        raise DataError(
            f"{name} has {bad} non-finite values (NaN or inf, or too large for float32) "
            f"out of {x32.size}; check the model output (a diverged loss?) before evaluating"
        )
    return x32, arr.astype(np.float64)


def _labels(labels: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = _to_numpy(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(
            f"{name}_labels has shape {tuple(arr.shape)} but {name} has {n} rows; "
            "pass one label per embedding as a 1-D array"
        )
    return arr


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    values = tuple(ks) if isinstance(ks, Sequence) else ()
    if not values or any(
        isinstance(k, bool) or not isinstance(k, Integral) or k < 1 for k in values
    ):
        raise ConfigError(f"ks {ks!r} must be a non-empty sequence of positive integers")
    return tuple(sorted({int(k) for k in values}))
