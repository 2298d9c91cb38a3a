"""Retrieval metrics: hand-placed examples, every metric against brute force, faiss indexes."""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import pytest
import torch

from siamese.errors import ConfigError, DataError
from siamese.evaluation import (
    build_index,
    exact_search,
    normalize,
    retrieval_metrics,
    scored_retrieval_metrics,
)

# Six 2-D points on the x axis, three classes; p5 is the only C.
#   x:     0    1    3    2.2  7    12
#   label: A    A    B    A    B    C
POINTS = torch.tensor([[0.0, 0], [1, 0], [3, 0], [2.2, 0], [7, 0], [12, 0]])


LABELS = torch.tensor([0, 0, 1, 0, 1, 2])  # A=0, B=1, C=2


KS = (1, 2, 5)


def brute_force(query, query_labels, gallery=None, gallery_labels=None, metric="l2", ks=KS):
    """The definitions, one query at a time: rank by (distance, gallery index)."""
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, query_labels
    q, g = query.double(), gallery.double()
    # Identical gallery rows must get identical distances: score the distinct rows only.
    distinct, inverse = torch.unique(g, dim=0, return_inverse=True)
    if metric == "l2":
        dist = torch.cdist(q, distinct, compute_mode="donot_use_mm_for_euclid_dist")[:, inverse]
    else:
        dist = -(q @ distinct.T)[:, inverse]

    sums = dict.fromkeys(["precision_at_1", "r_precision", "map_at_r"], 0.0)
    sums.update({f"recall_at_{k}": 0.0 for k in ks})
    without_positive = 0
    for i in range(len(q)):
        order = torch.sort(dist[i], stable=True).indices  # stable: ties keep index order
        if leave_one_out:
            order = order[order != i]
        relevant = (gallery_labels[order] == query_labels[i]).tolist()
        r = sum(relevant)
        if r == 0:
            without_positive += 1
            continue
        sums["precision_at_1"] += relevant[0]
        for k in ks:
            sums[f"recall_at_{k}"] += any(relevant[:k])
        sums["r_precision"] += sum(relevant[:r]) / r
        sums["map_at_r"] += (
            sum(relevant[j] * sum(relevant[: j + 1]) / (j + 1) for j in range(r)) / r
        )
    scored = len(q) - without_positive
    out = {name: value / scored for name, value in sums.items()}
    out["num_queries"] = float(len(q))
    out["num_queries_without_positive"] = float(without_positive)
    return out


def assert_same_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_hand_example_leave_one_out():
    # Each query ranked against the other five (rank: index, label):
    #   p0 x=0   : p1 A, p3 A, p2 B, p4 B, p5 C  R=2 rel 1 1 0 0 0  P@1 1  RP 2/2  AP (1 + 1)/2 = 1
    #   p1 x=1   : p0 A, p3 A, p2 B, p4 B, p5 C  R=2 rel 1 1 0 0 0  P@1 1  RP 1    AP 1
    #   p2 x=3   : p3 A, p1 A, p0 A, p4 B, p5 C  R=1 rel 0 0 0 1 0  P@1 0  RP 0    AP 0
    #   p3 x=2.2 : p2 B, p1 A, p0 A, p4 B, p5 C  R=2 rel 0 1 1 0 0  P@1 0  RP 1/2  AP (1/2)/2 = 1/4
    #   p4 x=7   : p2 B, p3 A, p5 C, p1 A, p0 A  R=1 rel 1 0 0 0 0  P@1 1  RP 1    AP 1
    #   p5 x=12  : no other C -> left out and counted
    # Over the 5 scored queries: P@1 = 3/5; recall@1 = 3/5, recall@2 = 4/5 (p2 misses),
    # recall@5 = 5/5; RP = (1 + 1 + 0 + 1/2 + 1)/5 = 0.7; MAP@R = (1 + 1 + 0 + 1/4 + 1)/5 = 0.65.
    expected = {
        "precision_at_1": 0.6,
        "recall_at_1": 0.6,
        "recall_at_2": 0.8,
        "recall_at_5": 1.0,
        "r_precision": 0.7,
        "map_at_r": 0.65,
        "num_queries": 6.0,
        "num_queries_without_positive": 1.0,
    }
    assert_same_metrics(retrieval_metrics(POINTS, LABELS, ks=KS), expected)
    assert_same_metrics(retrieval_metrics(POINTS.numpy(), LABELS.numpy(), ks=KS), expected)


def test_hand_example_separate_gallery():
    # The six points above are the gallery. Squared distances and ranking per query:
    #   q0 (2, 5)  B: p3 25.04, p1 26, p2 26, p0 29, p4 50, p5 125. p1 and p2 tie and the lower
    #      index goes first, so B first shows at rank 3. R=2 rel 0 0 1 0 1 0: P@1 0, recall
    #      0 0 1, RP 0, AP 0 (had the tie gone the other way RP would be 1/2).
    #   q1 (0.5, 0) A: p0 .25, p1 .25, p3 2.89, p2 6.25, ... R=3 rel 1 1 1: P@1 1, RP 1, AP 1.
    #   q2 (5, 0)  A: p2 4, p4 4, p3 7.84, p1 16, p0 25, p5 49. R=3 rel 0 0 1 1 1 0: P@1 0,
    #      recall 0 0 1, RP 1/3, AP (1/3)/3 = 1/9.
    #   q3 (20, 0) D: no D in the gallery -> left out and counted.
    #   q4 (12, 1) C: p5 1 first. R=1: P@1 1, recall 1 1 1, RP 1, AP 1.
    # Over 4 scored: P@1 = 2/4; recall@1 = recall@2 = 2/4, recall@5 = 1;
    # RP = (0 + 1 + 1/3 + 1)/4 = 7/12; MAP@R = (0 + 1 + 1/9 + 1)/4 = 19/36.
    query = torch.tensor([[2.0, 5], [0.5, 0], [5, 0], [20, 0], [12, 1]])
    query_labels = torch.tensor([1, 0, 0, 3, 2])
    expected = {
        "precision_at_1": 0.5,
        "recall_at_1": 0.5,
        "recall_at_2": 0.5,
        "recall_at_5": 1.0,
        "r_precision": 7 / 12,
        "map_at_r": 19 / 36,
        "num_queries": 5.0,
        "num_queries_without_positive": 1.0,
    }
    got = retrieval_metrics(query, query_labels, POINTS, LABELS, ks=KS)
    assert_same_metrics(got, expected)
    assert_same_metrics(brute_force(query, query_labels, POINTS, LABELS), expected)


def random_embeddings(seed: int = 0, n: int = 200, dim: int = 32, classes: int = 10):
    """torch.rand points with exact duplicates (ties with self and across classes) and a
    class of size one."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.rand(n, dim, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    emb[100:110] = emb[0:10]  # duplicates, same labels as their originals
    labels[100:110] = labels[0:10]
    emb[110:115] = emb[20]  # five more copies of row 20 under other labels
    labels[110:115] = torch.arange(5)
    labels[7] = classes  # a class of one: row 7 (its copy, row 107, keeps the old label)
    return emb, labels


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_leave_one_out_matches_brute_force(metric):
    emb, labels = random_embeddings()
    expected = brute_force(emb, labels, metric=metric, ks=(1, 5, 10))
    assert expected["num_queries_without_positive"] == 1.0
    got = retrieval_metrics(emb, labels, metric=metric)
    assert_same_metrics(got, expected)
    # Blocks of 7 queries give bit-identical numbers.
    assert retrieval_metrics(emb, labels, metric=metric, block_size=7) == got


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_separate_gallery_matches_brute_force(metric):
    emb, labels = random_embeddings(seed=1)
    query, query_labels = emb[90:], labels[90:]
    gallery, gallery_labels = emb[:130], labels[:130]  # shares rows (and their copies)
    expected = brute_force(query, query_labels, gallery, gallery_labels, metric, ks=(1, 5, 10))
    got = retrieval_metrics(query, query_labels, gallery, gallery_labels, metric=metric)
    assert_same_metrics(got, expected)
    again = retrieval_metrics(
        query, query_labels, gallery, gallery_labels, metric=metric, block_size=7
    )
    assert again == got


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_many_exact_ties_between_distinct_points(metric):
    # Small integer coordinates: distances are exact in float32 and float64 alike, and most
    # ranks are shared by several distinct points, so every cut-off falls inside a tie.
    gen = torch.Generator().manual_seed(2)
    emb = torch.randint(0, 3, (200, 6), generator=gen).float()
    labels = torch.randint(0, 4, (200,), generator=gen)
    expected = brute_force(emb, labels, metric=metric, ks=(1, 5, 10))
    assert_same_metrics(retrieval_metrics(emb, labels, metric=metric, block_size=7), expected)
    expected = brute_force(emb[:50], labels[:50], emb[50:], labels[50:], metric, ks=(1, 5, 10))
    got = retrieval_metrics(emb[:50], labels[:50], emb[50:], labels[50:], metric=metric)
    assert_same_metrics(got, expected)


def adversarial_tile_keys(self, neg_q, start, stop, out):
    """float32 keys as unhelpful as the proven error bound allows: each is off by up to half
    the bound, so near-ties come out in any order."""
    g = self.x[start:stop].astype(np.float64)
    q = -neg_q.astype(np.float64)
    exact = -(q @ g.T)
    scale = np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(g, axis=1)[None, :]
    if self.metric == "l2":
        half_sq = (g * g).sum(axis=1) / 2
        exact += half_sq
        scale += half_sq
    rng = np.random.default_rng(start)
    out[:] = exact + 0.5 * self.key_error * scale * rng.uniform(-1, 1, exact.shape)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ranking_does_not_trust_float32_order(metric, monkeypatch):
    monkeypatch.setattr(exact_search.Gallery, "tile_keys", adversarial_tile_keys)
    # Exact ties between distinct points (small integer coordinates) ...
    gen = torch.Generator().manual_seed(5)
    emb = torch.randint(0, 3, (200, 6), generator=gen).float()
    labels = torch.randint(0, 4, (200,), generator=gen)
    expected = brute_force(emb, labels, metric=metric, ks=(1, 5, 10))
    assert_same_metrics(retrieval_metrics(emb, labels, metric=metric), expected)
    # ... and near-duplicates, closer than the noise, whose order the noise scrambles.
    emb, labels = random_embeddings(seed=5)
    emb[150:200] = emb[0:50] + 1e-6 * torch.rand(50, 32, generator=gen)
    expected = brute_force(emb, labels, metric=metric, ks=(1, 5, 10))
    assert_same_metrics(retrieval_metrics(emb, labels, metric=metric), expected)


def near_ties(seed: int = 0, dim: int = 16):
    """Pairs of points one float32 step apart in a few small coordinates, under different
    labels, among other Gaussian points: their distances differ in about the 10th digit,
    below what float32 arithmetic (even a float32 difference of coordinates) resolves."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((240, dim)).astype(np.float32)
    small = rng.choice(dim, 3, replace=False)
    emb[:160, small] *= np.float32(1e-3)
    emb[80:160] = emb[:80]
    for j in small:
        away = rng.choice(np.array([-np.inf, np.inf], dtype=np.float32), 80)
        emb[80:160, j] = np.nextafter(emb[80:160, j], away)  # float32 steps
    labels = rng.integers(0, 6, 240)
    return torch.from_numpy(emb), torch.from_numpy(labels)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_near_ties_below_float32_resolution(metric):
    # The Gaussian points query the pairs. (A pair point querying another pair point sees
    # distances that differ below float64 resolution: no ranking is right there.)
    emb, labels = near_ties()
    query, gallery = emb[160:], emb[:160]
    expected = brute_force(query, labels[160:], gallery, labels[:160], metric, ks=(1, 5, 10))
    got = retrieval_metrics(query, labels[160:], gallery, labels[:160], metric=metric)
    assert_same_metrics(got, expected)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_small_tiles_and_bad_guesses(metric, monkeypatch):
    # Tiles of a few items, a sample that guesses the k-th key badly, and candidates capped
    # just past k: every fallback path, and the same numbers.
    monkeypatch.setattr(exact_search, "_TILE_ELEMENTS", 64)
    monkeypatch.setattr(exact_search, "_SAMPLE_MAX", 9)
    monkeypatch.setattr(exact_search, "_SAMPLE_MIN", 9)
    monkeypatch.setattr(exact_search, "_EXTRA_CANDIDATES", 0)
    monkeypatch.setattr(exact_search, "_CHUNK_ELEMENTS", 40)
    emb, labels = random_embeddings(seed=6)
    expected = brute_force(emb, labels, metric=metric, ks=(1, 5, 10))
    assert_same_metrics(retrieval_metrics(emb, labels, metric=metric, block_size=13), expected)
    gen = torch.Generator().manual_seed(6)
    emb = torch.randint(0, 3, (120, 4), generator=gen).float()
    labels = torch.randint(0, 3, (120,), generator=gen)
    expected = brute_force(emb, labels, metric=metric, ks=(1, 5, 10))
    assert_same_metrics(retrieval_metrics(emb, labels, metric=metric, block_size=13), expected)
    # Many small classes (k = 10) and a cap of 15 candidates below the sample's guess.
    monkeypatch.setattr(exact_search, "_SAMPLE_MAX", 60)
    monkeypatch.setattr(exact_search, "_SAMPLE_MIN", 60)
    monkeypatch.setattr(exact_search, "_EXTRA_CANDIDATES", -25)
    emb, labels = random_embeddings(seed=7, classes=80)
    expected = brute_force(emb, labels, metric=metric, ks=(1, 5, 10))
    assert_same_metrics(retrieval_metrics(emb, labels, metric=metric, block_size=13), expected)


def test_far_from_the_origin():
    # float32 keys |g|^2 / 2 - q.g (like faiss's |q|^2 + |g|^2 - 2 q.g) at |x|^2 ~ 3e7 lose
    # every digit of distances ~ 1e-3, so their order is noise. The ranking must still be
    # the exact one.
    emb, labels = random_embeddings(seed=4)
    emb = 1000.0 + 0.01 * emb
    expected = brute_force(emb, labels, ks=(1, 5, 10))
    assert_same_metrics(retrieval_metrics(emb, labels), expected)


def test_input_types_give_the_same_numbers():
    emb, labels = random_embeddings(seed=3)
    reference = retrieval_metrics(emb, labels)
    assert retrieval_metrics(emb.numpy(), labels.numpy()) == reference
    assert retrieval_metrics(emb.double(), labels) == reference
    # A read-only array (np.load with mmap_mode="r", say) works and warns about nothing.
    frozen = emb.numpy().copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert retrieval_metrics(frozen, labels.numpy()) == reference
    # Cosine: normalise and use the inner product.
    cosine = retrieval_metrics(normalize(emb), labels, metric="ip")
    assert_same_metrics(
        cosine, brute_force(torch.from_numpy(normalize(emb)), labels, metric="ip", ks=(1, 5, 10))
    )


def test_normalize():
    x = normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def test_errors():
    emb, labels = POINTS, LABELS
    with pytest.raises(DataError, match="6 rows"):
        retrieval_metrics(emb, labels[:5], ks=(1,))
    bad = emb.clone()
    bad[0, 0] = float("nan")
    bad[3, 1] = float("inf")
    with pytest.raises(DataError, match="2 non-finite"):
        retrieval_metrics(bad, labels, ks=(1,))
    with pytest.raises(ConfigError, match="k=10 is larger than the 5 items"):
        retrieval_metrics(emb, labels)  # leave-one-out: 5 others per query
    with pytest.raises(ConfigError, match="k=7 is larger than the 6 items"):
        retrieval_metrics(emb, labels, emb, labels, ks=(1, 7))
    with pytest.raises(DataError, match="dimension 3 but query has 2"):
        retrieval_metrics(emb, labels, torch.zeros(6, 3), labels, ks=(1,))
    with pytest.raises(DataError, match="non-empty 2-D"):
        retrieval_metrics(torch.zeros(0, 2), torch.zeros(0), ks=(1,))
    with pytest.raises(DataError, match="non-empty 2-D"):
        retrieval_metrics(emb, labels, torch.zeros(0, 2), torch.zeros(0), ks=(1,))
    with pytest.raises(ConfigError, match="metric 'cos'"):
        retrieval_metrics(emb, labels, metric="cos", ks=(1,))
    with pytest.raises(ConfigError, match="given together"):
        retrieval_metrics(emb, labels, emb, ks=(1,))
    with pytest.raises(ConfigError, match="positive integers"):
        retrieval_metrics(emb, labels, ks=(0, 1))
    with pytest.raises(DataError, match="none of the 2 queries"):
        retrieval_metrics(emb[:2], torch.tensor([5, 6]), emb, labels, ks=(1,))


def test_labels_that_name_no_class_are_refused_in_one_line():
    emb = POINTS
    nan = torch.full((6,), float("nan"))
    with pytest.raises(DataError) as err:  # np.unique merges NaNs: this scored 1.0
        retrieval_metrics(emb, nan, ks=(1,))
    assert str(err.value).startswith("query_labels has 6 NaN value(s) of 6 (first at row 0)")
    assert "all integers or all strings" in str(err.value)
    some = LABELS.double()
    some[4] = float("nan")
    with pytest.raises(
        DataError, match=r"gallery_labels has 1 NaN value\(s\) of 6 \(first at row 4\)"
    ):
        retrieval_metrics(emb, LABELS, emb, some, ks=(1,))
    mixed = np.array([0, 0, "b", 0, "b", "c"], dtype=object)
    with pytest.raises(DataError) as err:  # numpy's TypeError from sorting before
        retrieval_metrics(emb, mixed, ks=(1,))
    assert str(err.value).startswith(
        "query_labels mixes numbers and strings (0 at row 0, 'b' at row 2)"
    )
    with pytest.raises(DataError, match=r"query_labels has None at row 1"):
        retrieval_metrics(emb, np.array([0, None, 1, 0, 1, 2], dtype=object), ks=(1,))
    # Ints against strings: np.concatenate would turn 1 into "1" and match it silently.
    names = np.array(["0", "0", "1", "0", "1", "2"])
    with pytest.raises(DataError) as err:
        retrieval_metrics(emb, LABELS, emb, names, ks=(1,))
    assert str(err.value).startswith(
        "query_labels are numbers (int64) but gallery_labels are strings (<U1)"
    )
    assert "\n" not in str(err.value)

    # Labels of one kind, in any container, still score as integer labels do.
    expected = retrieval_metrics(emb, LABELS, ks=KS)
    as_text = np.array(["a", "a", "b", "a", "b", "c"], dtype=object)
    assert retrieval_metrics(emb, as_text, ks=KS) == expected
    assert retrieval_metrics(emb, names, emb, names.astype(object), ks=KS) == retrieval_metrics(
        emb, LABELS, emb, LABELS, ks=KS
    )
    assert retrieval_metrics(emb, LABELS.double(), ks=KS) == expected


def separated(metric: str = "l2", seed: int = 0):
    """Twelve tight classes of 25 far apart: any decent search ranks a class first."""
    rng = np.random.default_rng(seed)
    centres = 10 * rng.standard_normal((12, 16))
    labels = np.repeat(np.arange(12), 25)
    emb = (centres[labels] + 0.1 * rng.standard_normal((300, 16))).astype(np.float32)
    return (normalize(emb) if metric == "ip" else emb), labels


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize(
    ("kind", "params"),
    # ef_search 8 < the k + 9 = 34 searched: HNSW must be widened for the search.
    [("ivf", {"nlist": 4, "nprobe": 2}), ("hnsw", {"ef_search": 8})],
)
def test_approximate_kinds_match_flat_on_separated_data(kind, params, metric):
    emb, labels = separated(metric)
    flat = retrieval_metrics(emb, labels, metric=metric)
    assert flat["precision_at_1"] == flat["map_at_r"] == 1.0
    got = retrieval_metrics(emb, labels, metric=metric, index=kind, index_params=params)
    assert got.pop("approx_recall_at_10") == 1.0
    assert got == flat
    # Separate gallery: the first 5 of each class query the other 20.
    query = np.arange(300) % 25 < 5
    args = (emb[query], labels[query], emb[~query], labels[~query])
    got = retrieval_metrics(*args, metric=metric, index=kind, index_params=params)
    assert got.pop("approx_recall_at_10") == 1.0
    assert got == retrieval_metrics(*args, metric=metric)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_hand_example_with_approximate_kinds(kind):
    # Six points: IVF has one list and HNSW reaches every node, so the search is exhaustive
    # and the numbers are the hand-computed ones of test_hand_example_leave_one_out.
    got = retrieval_metrics(POINTS, LABELS, ks=KS, index=kind)
    assert got.pop("approx_recall_at_10") == 1.0  # top 5 here: all the others
    assert_same_metrics(got, retrieval_metrics(POINTS, LABELS, ks=KS))
    assert got["map_at_r"] == pytest.approx(0.65, abs=1e-15)


def test_approx_recall_counts_missed_neighbours():
    # Overlapping Gaussian classes and an IVF index that probes 1 of 16 lists: it misses
    # neighbours. approx_recall_at_10 (every scored query sampled here) is the mean overlap
    # of faiss's own top 10 (without the query) with the brute-force top 10.
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((400, 8)).astype(np.float32)
    labels = rng.integers(0, 5, 400)
    index = build_index(emb, kind="ivf", nlist=16, nprobe=1)
    got = retrieval_metrics(emb, labels, index=index, recall_sample=400)
    e = emb.astype(np.float64)
    dist = ((e[:, None] - e[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    exact = np.argsort(dist, axis=1, kind="stable")[:, :10]
    _, found = index.search(emb, 11)
    overlap = [
        len(np.intersect1d(ids[(ids != i) & (ids >= 0)][:10], exact[i]))
        for i, ids in enumerate(found)
    ]
    assert 0.3 < got["approx_recall_at_10"] < 0.9
    assert got["approx_recall_at_10"] == pytest.approx(np.mean(overlap) / 10, abs=1e-12)
    # Metrics of an approximate search are its own, not exact search's.
    assert got["map_at_r"] != retrieval_metrics(emb, labels)["map_at_r"]


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_prebuilt_index_is_used_and_left_unchanged(kind, leave_one_out, tmp_path):
    emb, labels = separated()
    emb[150:] += 0.5 * np.random.default_rng(2).standard_normal((150, 16)).astype(np.float32)
    query = np.arange(300) % 25 < 8
    if leave_one_out:
        args, gallery = (emb, labels), emb
    else:
        args, gallery = (emb[query], labels[query], emb[~query], labels[~query]), emb[~query]
    params = {"nlist": 6, "nprobe": 2} if kind == "ivf" else {}
    index = build_index(gallery, kind=kind, **params)
    before = faiss.serialize_index(index)
    got = retrieval_metrics(*args, index=index)
    # Searching did not change the index (nprobe, efSearch, contents: every byte) ...
    assert index.ntotal == len(gallery)
    assert np.array_equal(faiss.serialize_index(index), before)
    # ... so the evaluate command can save it afterwards and read it back.
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    again = faiss.read_index(str(tmp_path / "index.faiss"))
    assert retrieval_metrics(*args, index=again) == got
    if kind != "hnsw":  # HNSW built with two threads need not come out the same twice
        assert retrieval_metrics(*args, index=kind, index_params=params) == got
    assert ("approx_recall_at_10" in got) == (kind != "flat")
    if kind == "flat":
        assert got == retrieval_metrics(*args)


def noisy_search(index, gallery: np.ndarray, metric: str, error: float):
    """``index.search`` made as unhelpful as ``error`` allows: distances off by up to half of
    it (times |q|^2 + |g|^2, or |q| |g|) and equal distances highest index first."""
    search = index.search
    g_sq = (gallery.astype(np.float64) ** 2).sum(axis=1)
    rng = np.random.default_rng(0)

    def adversarial(x, k):
        dist, ids = search(x, k)
        q_sq = (x.astype(np.float64) ** 2).sum(axis=1, keepdims=True)
        scale = q_sq + g_sq[ids] if metric == "l2" else np.sqrt(q_sq * g_sq[ids])
        dist = dist + 0.5 * error * scale * rng.uniform(-1, 1, dist.shape)
        sign = 1.0 if metric == "l2" else -1.0
        order = np.lexsort((-ids, sign * dist), axis=-1)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)

    return adversarial


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_candidates_are_ranked_exactly(metric):
    # An exhaustive IVF (nprobe = nlist) proposes the exact top k + 1; its float32 order,
    # scrambled within the bound trusted for it, must not show in the ranking. Duplicates
    # and near-duplicates closer than the noise, under different labels.
    emb, labels = random_embeddings(seed=7)
    gen = torch.Generator().manual_seed(7)
    emb[150:200] = emb[0:50] + 1e-6 * torch.rand(50, 32, generator=gen)
    x = emb.numpy()
    index = build_index(x, metric=metric, kind="ivf", nlist=4, nprobe=4)
    error = (32 + 8) * float(np.finfo(np.float32).eps)
    index.search = noisy_search(index, x, metric, error)
    expected = brute_force(emb, labels, metric=metric, ks=(1, 5, 10))
    got = retrieval_metrics(emb, labels, metric=metric, index=index, ks=(1, 5, 10))
    assert got.pop("approx_recall_at_10") == 1.0
    assert_same_metrics(got, expected)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_other_faiss_indexes_are_reranked_fully(metric):
    # An index that build_index does not make (here an id map around a flat index) gets no
    # error bound: its distances may be anything, so every candidate is ranked in float64.
    emb, labels = random_embeddings(seed=8)
    x = emb.numpy()
    inner = faiss.IndexFlatL2(32) if metric == "l2" else faiss.IndexFlatIP(32)
    index = faiss.IndexIDMap(inner)
    index.add_with_ids(x, np.arange(len(x)))
    index.search = noisy_search(index, x, metric, 1e-3)
    expected = brute_force(emb, labels, metric=metric, ks=(1, 5, 10))
    got = retrieval_metrics(emb, labels, metric=metric, index=index)
    assert got.pop("approx_recall_at_10") == 1.0
    assert_same_metrics(got, expected)


def test_other_indexes_with_missing_results():
    # An IVF probing 1 of 10 lists returns -1 for part of the k asked; the same IVF in an
    # id map is an "other" index with the same candidates: the same numbers, as every
    # candidate is ranked exactly either way.
    emb, labels = random_embeddings(seed=9, n=400)
    x = emb.numpy()
    ivf = build_index(x, kind="ivf", nlist=10, nprobe=1)
    _, found = ivf.search(x, 60)
    assert (found == -1).any()
    inner = faiss.clone_index(ivf)
    inner.reset()  # trained, empty
    wrapped = faiss.IndexIDMap(inner)
    wrapped.add_with_ids(x, np.arange(len(x)))
    got = retrieval_metrics(emb, labels, index=wrapped)
    assert got == retrieval_metrics(emb, labels, index=ivf)
    assert got["approx_recall_at_10"] < 1.0


def test_index_errors():
    emb, labels = separated()
    with pytest.raises(ConfigError, match="index 'lsh' is not supported"):
        retrieval_metrics(emb, labels, index="lsh")
    with pytest.raises(ConfigError, match="index must be one of .* not int"):
        retrieval_metrics(emb, labels, index=3)
    with pytest.raises(ConfigError, match="nlist 301 is larger than the 300 gallery items"):
        retrieval_metrics(emb, labels, index="ivf", index_params={"nlist": 301})
    with pytest.raises(ConfigError, match=r"index_params \['nprobes'\] are not keywords"):
        retrieval_metrics(emb, labels, index="ivf", index_params={"nprobes": 4})
    with pytest.raises(ConfigError, match=r"index_params \['nprobe'\] do not apply to index='fl"):
        retrieval_metrics(emb, labels, index="flat", index_params={"nprobe": 4})
    with pytest.raises(ConfigError, match="ef_search 0 must be a positive integer"):
        retrieval_metrics(emb, labels, index="hnsw", index_params={"ef_search": 0})
    with pytest.raises(ConfigError, match="must not set 'metric' or 'kind'"):
        retrieval_metrics(emb, labels, index="ivf", index_params={"metric": "ip"})
    with pytest.raises(ConfigError, match="recall_sample 0 must be a positive integer"):
        retrieval_metrics(emb, labels, index="ivf", recall_sample=0)
    index = build_index(emb[:100])
    with pytest.raises(ConfigError, match="holds 100 vectors of dimension 16 but the query"):
        retrieval_metrics(emb, labels, index=index)
    with pytest.raises(ConfigError, match="index_params apply only when index is a name"):
        retrieval_metrics(emb[:100], labels[:100], index=index, index_params={"nprobe": 2})
    with pytest.raises(ConfigError, match="does not search by metric='ip'"):
        retrieval_metrics(emb[:100], labels[:100], metric="ip", index=index)


def _squared_l2(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    return ((a[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1)


def test_scored_ranking_with_l2_equals_the_exact_index_ties_included():
    """Integer points in a small cube: many exact ties, broken by gallery index in both."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (300, 4)).astype(np.float32)
    y = rng.integers(0, 8, 300)
    ks = (1, 5, 10)
    loo = scored_retrieval_metrics(x, y, scorer=_squared_l2, ks=ks)
    assert loo == retrieval_metrics(x, y, ks=ks)
    q, g = x[:100], x[100:]
    sep = scored_retrieval_metrics(q, y[:100], g, y[100:], scorer=_squared_l2, ks=ks)
    assert sep == retrieval_metrics(q, y[:100], g, y[100:], ks=ks)
    assert 0 < loo["map_at_r"] < 1 and loo["num_queries"] == 300


def test_a_head_that_weighs_one_dimension_ranks_by_hand():
    # Points 0, 1 of class a and 2, 3 of class b; the "head" scores |x0 - y0| only.
    #   query 0: 2 (0.1), 1 (0.5), 3 (10)   -> first relevant at rank 2
    #   query 1: 2 (0.4), 0 (0.5), 3 (9.5)  -> rank 2
    #   query 2: 0 (0.1), 1 (0.4), 3 (9.9)  -> rank 3
    #   query 3: 1 (9.5), 2 (9.9), 0 (10)   -> rank 2
    # R = 1 for each: precision@1 = R-precision = MAP@R = 0, recall@2 = 3/4. Euclidean
    # distance ranks 0 and 1 right (each other at 0.5): precision@1 1/2.
    x = np.array([[0, 0], [0.5, 0], [0.1, 5], [10, 0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])

    def first_dimension(a: np.ndarray, g: np.ndarray) -> np.ndarray:
        return np.abs(a[:, None, 0] - g[None, :, 0])

    got = scored_retrieval_metrics(x, y, scorer=first_dimension, ks=(1, 2))
    assert got == {
        "precision_at_1": 0.0,
        "recall_at_1": 0.0,
        "recall_at_2": 0.75,
        "r_precision": 0.0,
        "map_at_r": 0.0,
        "num_queries": 4.0,
        "num_queries_without_positive": 0.0,
    }
    assert retrieval_metrics(x, y, ks=(1, 2))["precision_at_1"] == 0.5


def test_a_bad_scorer_is_one_line():
    x, y = np.zeros((4, 2), dtype=np.float32), np.array([0, 0, 1, 1])
    with pytest.raises(DataError, match=r"scorer returned shape \(4, 3\); expected \(4, 4\)"):
        scored_retrieval_metrics(x, y, scorer=lambda a, g: np.zeros((len(a), 3)), ks=(1,))
    with pytest.raises(DataError, match="non-finite distances"):
        scored_retrieval_metrics(x, y, scorer=lambda a, g: np.full((len(a), 4), np.nan), ks=(1,))


# faiss.contrib.torch_utils replaces faiss.Index.search for the whole process (with a
# version that takes no params=), so it is imported in a process of its own.
TORCH_UTILS_HNSW = """
import json, sys
import faiss, faiss.contrib.torch_utils
import numpy as np
from siamese.evaluation import build_index, retrieval_metrics
assert hasattr(faiss.IndexHNSWFlat, "search_numpy")  # the replacement is in place
x, labels = np.load(sys.argv[1]), np.load(sys.argv[2])
named = retrieval_metrics(x, labels, index="hnsw", index_params={"ef_search": 8})
built = retrieval_metrics(x, labels, index=build_index(x, kind="hnsw", ef_search=8))
print(json.dumps([named, built]))
"""


def test_hnsw_search_after_faiss_torch_utils_is_imported(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    emb, labels = separated()
    np.save(tmp_path / "x.npy", emb)
    np.save(tmp_path / "y.npy", labels)
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_UTILS_HNSW, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    exact = retrieval_metrics(emb, labels)
    for got in json.loads(proc.stdout.strip().splitlines()[-1]):
        # ef_search 8 < the 34 searched: the widened search (params=) found every neighbour.
        assert got.pop("approx_recall_at_10") == 1.0
        assert got == exact
