"""faiss indexes over a gallery of embeddings: exact (flat) or approximate (IVF, HNSW).

``build_index`` turns a (N, D) gallery into a searchable ``faiss.Index`` with defaults that
give high recall on clustered embeddings; ``retrieval_metrics`` accepts the result (or the
kind's name), and ``IndexSearch`` ranks faiss's candidates by exact distances itself.
``index_kind`` names what an index is; ``search`` calls faiss's search with parameters also
where ``faiss.contrib.torch_utils`` has replaced it.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from siamese.checks import check_int
from siamese.errors import ConfigError
from siamese.evaluation.arrays import as_embeddings
from siamese.evaluation.exact_search import Gallery, rank

KINDS = ("flat", "ivf", "hnsw")
METRICS = ("l2", "ip")

# IVF: faiss's k-means wants at least this many training points per list.
_MIN_POINTS_PER_LIST = 39
# IVF: training points per list (faiss itself would subsample to 256 per list).
_TRAIN_POINTS_PER_LIST = 64
_IVF_TRAIN_ITERATIONS = 10
_DEFAULT_NPROBE = 32
_HNSW_EF_CONSTRUCTION = 100
_HNSW_EF_SEARCH = 128
# Candidates asked of a faiss index past the k needed.
_EXTRA_INDEX_CANDIDATES = 8
# A key bound so loose that all candidates of a row land in one group: twice it is still a
# finite float32, above any difference of keys (check_range), below inf - key (padding).
_NO_BOUND = float(np.finfo(np.float32).max) / 4


def build_index(
    gallery: np.ndarray | torch.Tensor,
    *,
    metric: str = "l2",
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int | None = None,
    ef_search: int | None = None,
    seed: int = 0,
) -> faiss.Index:
    """A faiss index over ``gallery`` (rows keep their order as ids 0..N-1).

    Args:
        gallery: (N, D) embeddings.
        metric: "l2" (squared euclidean) or "ip" (inner product; normalise for cosine).
        kind: "flat" (exact, ``IndexFlatL2``/``IndexFlatIP``), "ivf" (``IndexIVFFlat``,
            approximate) or "hnsw" (``IndexHNSWFlat``, approximate).
        nlist: IVF lists; None: 4 * sqrt(N), clipped so each list has at least 39 training
            points.
        nprobe: IVF lists searched per query; None: 32 (or nlist if smaller). On clustered
            128-d embeddings (benchmarks/retrieval.py) that found 0.99 of the exact 10
            nearest neighbours with 200,000 items and 0.955 with 1,000,000 (16: 0.985 and
            0.943); raise it for higher recall, at a proportional cost in search time.
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW candidate list size while building; None: 100.
        ef_search: HNSW candidate list size while searching, which bounds how many items a
            search can return; None: 128. (retrieval_metrics widens it to the k it needs
            for each search without changing the index.)
        seed: IVF training sample and k-means initialisation. HNSW built with several
            threads is not bit-reproducible.

    Returns:
        The trained index with the gallery added. Searching it does not change it, so it can
        be saved with ``faiss.write_index`` after evaluation.
    """
    if kind not in KINDS:
        raise ConfigError(
            f"index kind {kind!r} is not supported; expected one of {KINDS} "
            "(flat is exact, ivf and hnsw are approximate)"
        )
    if metric not in METRICS:
        raise ConfigError(
            f"metric {metric!r} is not supported; expected one of {METRICS} "
            "(normalise the embeddings and use 'ip' for cosine)"
        )
    x = as_embeddings(gallery, "gallery")
    dim = x.shape[1]
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    for name, value in (("nlist", nlist), ("nprobe", nprobe)):
        if value is not None:
            check_int(name, value, 1, " (or null for the default)")
    check_int("hnsw_m", hnsw_m, 1, " (e.g. 32)")
    for name, value in (("ef_construction", ef_construction), ("ef_search", ef_search)):
        if value is not None:
            check_int(name, value, 1, " (or null for the default)")
    check_int("seed", seed, 0, ", e.g. 0")
    if kind != "ivf" and (nlist is not None or nprobe is not None):
        raise ConfigError(
            f"nlist and nprobe apply to kind='ivf' only, not kind={kind!r}; drop them "
            "or use kind='ivf'"
        )
    if kind != "hnsw" and (ef_construction is not None or ef_search is not None):
        raise ConfigError(
            f"ef_construction and ef_search apply to kind='hnsw' only, not kind={kind!r}; "
            "drop them or use kind='hnsw'"
        )

    if kind == "flat":
        index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        index = _ivf(x, faiss_metric, nlist, nprobe, seed)
    else:
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss_metric)
        index.hnsw.efConstruction = int(ef_construction or _HNSW_EF_CONSTRUCTION)
        index.hnsw.efSearch = int(ef_search or _HNSW_EF_SEARCH)
    index.add(x)
    return index


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` gallery items: 4 * sqrt(n), at most n / 39, at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // _MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """IVF lists searched per query: 32, or nlist if that is smaller."""
    return min(nlist, _DEFAULT_NPROBE)


def index_kind(index: faiss.Index) -> str:
    """The kind of an index: flat, ivf or hnsw for those build_index makes, else other."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw"
    return "other"


def search(
    index: faiss.Index, x: np.ndarray, k: int, params: faiss.SearchParameters | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """faiss's ``index.search(x, k, params=params)`` on a float32 array: (N, k) distances, ids.

    ``import faiss.contrib.torch_utils`` (pytorch-metric-learning's accuracy code does it)
    replaces ``Index.search`` in the whole process with a version that takes no ``params``,
    and keeps faiss's own as ``search_numpy``: that one is called where it exists.
    """
    method = getattr(index, "search_numpy", None) or index.search
    if params is None:
        return method(x, k)
    return method(x, k, params=params)


def _ivf(
    x: np.ndarray, faiss_metric: int, nlist: int | None, nprobe: int | None, seed: int
) -> faiss.Index:
    n, dim = x.shape
    if nlist is None:
        nlist = default_nlist(n)
    elif nlist > n:
        raise ConfigError(
            f"nlist {nlist} is larger than the {n} gallery items, so some lists would be "
            f"empty; use nlist <= {max(1, n // _MIN_POINTS_PER_LIST)} (or null for the default)"
        )
    if nprobe is None:
        nprobe = default_nprobe(nlist)
    elif nprobe > nlist:
        raise ConfigError(
            f"nprobe {nprobe} is larger than nlist {nlist}; use nprobe <= {nlist} "
            "(nprobe = nlist searches every list, as slowly as exhaustive search)"
        )
    quantizer = (
        faiss.IndexFlatL2(dim) if faiss_metric == faiss.METRIC_L2 else faiss.IndexFlatIP(dim)
    )
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
    index.cp.seed = seed
    index.cp.niter = _IVF_TRAIN_ITERATIONS
    # Train on a fixed-seed sample, sorted so it reads the gallery in order.
    n_train = min(n, _TRAIN_POINTS_PER_LIST * nlist)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
    index.cp.max_points_per_centroid = max(256, -(-n_train // nlist))  # no re-sampling
    index.train(np.ascontiguousarray(x[rows]))
    index.nprobe = nprobe
    return index


class IndexSearch:
    """Top-k from a faiss index's candidates, re-ranked by exact keys (approximate)."""

    def __init__(self, index: faiss.Index, gal: Gallery) -> None:
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
            distances, ids = search(self.index, q, wanted, params=params)
        else:
            distances, ids = search(self.index, q, wanted)
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
        cols, same, _ = rank(
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
