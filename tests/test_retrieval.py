"""Retrieval metrics: a hand-placed example, and every metric against a brute-force ranking."""

from __future__ import annotations

from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch

from siamese.errors import ConfigError, DataError
from siamese.evaluation import normalize, retrieval, retrieval_metrics

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


class AdversarialIndex:
    """An exact faiss index that is as unhelpful as faiss may legally be: its distances are
    off by a few float32 roundings and it returns equal distances highest index first."""

    def __init__(self, dim: int, metric: str) -> None:
        self.index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        self.sign = 1.0 if metric == "l2" else -1.0  # key: smaller is closer
        self.rng = np.random.default_rng(0)

    def add(self, x: np.ndarray) -> None:
        self.index.add(x)
        self.gallery_sq = (x.astype(np.float64) ** 2).sum(axis=1)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist, idx = self.index.search(x, self.index.ntotal)
        scale = (x.astype(np.float64) ** 2).sum(axis=1, keepdims=True) + self.gallery_sq[idx]
        noise = 4 * np.finfo(np.float32).eps * scale * self.rng.uniform(-1, 1, dist.shape)
        dist = (dist + noise).astype(np.float32)
        order = np.lexsort((-idx, self.sign * dist), axis=-1)[:, :k]
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ranking_does_not_trust_faiss_order(metric, monkeypatch):
    fake_faiss = SimpleNamespace(
        IndexFlatL2=lambda dim: AdversarialIndex(dim, "l2"),
        IndexFlatIP=lambda dim: AdversarialIndex(dim, "ip"),
    )
    monkeypatch.setattr(retrieval, "faiss", fake_faiss)
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


def test_far_from_the_origin():
    # With 20+ queries faiss computes |q|^2 + |g|^2 - 2 q.g in float32: at |x|^2 ~ 3e7 that
    # loses every digit of distances ~ 1e-3, so its own order is noise. The ranking must
    # still be the exact one.
    emb, labels = random_embeddings(seed=4)
    emb = 1000.0 + 0.01 * emb
    expected = brute_force(emb, labels, ks=(1, 5, 10))
    assert_same_metrics(retrieval_metrics(emb, labels), expected)


def test_input_types_give_the_same_numbers():
    emb, labels = random_embeddings(seed=3)
    reference = retrieval_metrics(emb, labels)
    assert retrieval_metrics(emb.numpy(), labels.numpy()) == reference
    assert retrieval_metrics(emb.double(), labels) == reference
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
