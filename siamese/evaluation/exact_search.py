"""Exact k-nearest-neighbour search in blocks: float32 matrix products, proven by a rounding bound.

Design note. A float32 key (|g|^2 / 2 - q.g for "l2", -q.g for "ip"; smaller is closer) of
D-dimensional rows is within (D + 4) 2^-24 (|q| |g| + |g|^2 / 2) of the exact key whatever
the summation order, FMA or BLAS (Higham 2002, 3.1). That one bound does two jobs:

- Completeness. Each query's k-th key is guessed from a fixed sample of the gallery, every
  item whose float32 key is at most the guess becomes a candidate, and a row is accepted
  only when its k-th candidate's key plus the bound lies below the lowest exact key an item
  outside the candidates can have. Rows not proven are searched again with a higher guess,
  at last with every item, so the top k is never missing an item.
- Order. Where consecutive float32 keys are more than twice the bound apart their order is
  certain; only the groups closer than that, and only where their order changes a metric
  (same- and other-class items within the first k), are re-ranked by float64 keys summed
  in a fixed tree. Exact duplicates tie exactly and break by gallery index.

Why not faiss's flat index: it ranks by float32 distances |q|^2 + |g|^2 - 2 q.g, so
near-ties come out in rounding order (which changes with thread count and block layout),
and far from the origin those distances lose every digit of the differences that matter;
it also keeps a k-deep heap per query over the whole gallery, while the metrics ask for
k = R (the class size, hundreds) neighbours. Here the result equals a float64 brute-force
sort by (distance, gallery index), bit for bit whatever the block size or thread count,
most items are dropped by one comparison against the guess, (key, index) pairs sort as one
uint64, and memory grows with block size * k, never N * N. Measured on 4,096 queries
against 20,000 unit 128-d items, k = 400: 1.3 s in one thread against faiss flat's 1.05 s
in two, whose top 400 differed from the exact order in 83 of the 4,096 rows.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from siamese.errors import DataError

# float32 keys of (queries x gallery items) computed at once by the exact search (64 MB).
_TILE_ELEMENTS = 1 << 24
# (query, candidate) pairs x dimensions recomputed in float64 at once (512 kB: in cache).
_CHUNK_ELEMENTS = 1 << 16
# Gallery items sampled to guess how far the k-th neighbour is: see ExactSearch.
_SAMPLE_MAX = 16384
_SAMPLE_MIN = 1024
# Keep at most this many candidates per query (plus 4 * k) before ranking them.
_EXTRA_CANDIDATES = 4096
# Padding of packed (key, index) candidates: sorts after every real one.
_PAD = np.uint64(np.iinfo(np.uint64).max)
_LOW_BITS = np.uint64(0xFFFFFFFF)


class Gallery:
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


def check_range(q32: np.ndarray, gal: Gallery) -> None:
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


def rank(
    gal: Gallery,
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


class ExactSearch:
    """Exact top-k by blocked float32 matrix products, proven and tie-broken by rank.

    Each query's k-th key is guessed from a fixed random sample of the gallery, and every
    item whose float32 key is below the guess becomes a candidate. A row is accepted when
    the guess was high enough to prove that no other item can rank in its top k; the few
    rows where it was not are searched again with a higher guess, and then with every item.
    """

    def __init__(self, gal: Gallery) -> None:
        self.gal = gal
        # A prefix of a random permutation is a random sample, whatever its length.
        self.sample_ids = np.random.default_rng(0).permutation(gal.size)[:_SAMPLE_MAX]
        self.sample = Gallery(
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
                ranked_cols, ranked_same, ranked = rank(
                    self.gal, q[rows[ok]], cols[ok], keys[ok],
                    lambda c, norms=norms: self.gal.key_bound(norms, c), k,
                    q_codes[rows[ok]], ids_exact[rows[ok]], count[ok] <= cols.shape[1],
                )  # fmt: skip
                out[rows[ok]], same[rows[ok]] = ranked_cols, ranked_same
                again = ok[~ranked]  # a tie ran past the unpacked columns
                if len(again):
                    cols, keys = _unpack(packed[again])
                    norms = q_norm[rows[again]]
                    out[rows[again]], same[rows[again]], _ = rank(
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
