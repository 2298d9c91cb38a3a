"""The evaluator: its report against the metric functions and brute force, and its figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.lines import Line2D

from siamese.data.pairs import sample_pairs
from siamese.evaluation import (
    Evaluator,
    Neighbours,
    oneshot_metrics,
    retrieval_metrics,
    verification_metrics,
)
from siamese.evaluation.evaluator import MAX_TOP_K


def clustered(n_classes: int = 6, per_class: int = 20, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    centres = rng.normal(size=(n_classes, dim)) * 1.5
    emb = (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
    return emb, labels


def test_report_holds_what_the_metric_functions_give():
    emb, labels = clustered()
    report = Evaluator(pairs=300, pairs_seed=3, oneshot_ways=(5,), oneshot_episodes=50).evaluate(
        emb, labels
    )
    want = retrieval_metrics(emb, labels, ks=(1, 5, 10))
    pairs = sample_pairs(torch.from_numpy(labels), 300, 3)
    first, second = pairs.first.numpy(), pairs.second.numpy()
    np.testing.assert_array_equal(report.first, first)
    np.testing.assert_array_equal(report.same, pairs.same.numpy())
    dist = np.linalg.norm(emb[first] - emb[second], axis=1)
    np.testing.assert_allclose(report.distances, dist, rtol=1e-6)
    want.update(verification_metrics(report.distances, report.same))
    want.update(oneshot_metrics(emb, labels, ways=(5,), episodes=50))
    for key, value in want.items():
        assert report.metrics[key] == value, key
        assert type(report.metrics[key]) is float, key
    same = report.same
    assert report.metrics["pos_distance"] == pytest.approx(dist[same].mean(), rel=1e-6)
    assert report.metrics["neg_distance"] == pytest.approx(dist[~same].mean(), rel=1e-6)
    assert report.threshold == report.metrics["threshold"]
    # Logged: everything but the counts and the confidence interval.
    logged = report.logged()
    assert "num_queries" not in logged and "oneshot_5way_1shot_ci95" not in logged
    assert logged["oneshot_5way_1shot"] == report.metrics["oneshot_5way_1shot"]
    assert set(report.metrics) - set(logged) == {
        "num_queries",
        "num_queries_without_positive",
        "num_pairs",
        "num_same",
        "oneshot_5way_1shot_ci95",
    }


def test_a_model_distance_and_a_target_far_are_used():
    emb, labels = clustered(seed=1)
    calls = []

    def halved(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        calls.append(len(a))
        return 0.5 * np.linalg.norm(a - b, axis=1)

    report = Evaluator(pair_distance=halved, pairs=200, target_far=0.05).evaluate(emb, labels)
    plain = Evaluator(pairs=200).evaluate(emb, labels)
    np.testing.assert_allclose(report.distances, 0.5 * plain.distances, rtol=1e-6)
    assert calls[0] == 200  # the pairs, then the neighbours of the sample
    different = report.distances[~report.same]
    assert np.mean(different <= report.threshold) <= 0.05
    assert report.metrics["threshold_target_far"] == 0.05
    assert "accuracy_at_threshold" in report.metrics
    # The neighbours' distances are the model's too.
    nb = report.neighbours
    q, g = emb[nb.queries[:, None]], emb[nb.ids]
    np.testing.assert_allclose(nb.distances, 0.5 * np.linalg.norm(q - g, axis=2), rtol=1e-5)


def test_neighbours_are_the_brute_force_nearest_other_items():
    torch.manual_seed(0)
    emb = torch.rand(200, 32)
    labels = torch.arange(200) % 7
    report = Evaluator(pairs=100).evaluate(emb, labels)
    nb = report.neighbours
    assert nb.ids.shape == (200, MAX_TOP_K) and nb.queries.tolist() == list(range(200))
    d = torch.cdist(emb.double(), emb.double())
    d.fill_diagonal_(float("inf"))
    want = torch.argsort(d, dim=1, stable=True)[:, :MAX_TOP_K].numpy()
    np.testing.assert_array_equal(nb.ids, want)
    top1 = labels.numpy()[want[:, 0]]
    np.testing.assert_array_equal(nb.wrong, top1 != labels.numpy())
    # A train gallery: neighbours index the gallery, a query's own row is not special.
    other = Evaluator(pairs=100).evaluate(emb[:50], labels[:50], emb[50:], labels[50:])
    d = torch.cdist(emb[:50].double(), emb[50:].double())
    want = torch.argsort(d, dim=1, stable=True)[:, :MAX_TOP_K].numpy()
    np.testing.assert_array_equal(other.neighbours.ids, want)


def test_a_query_without_a_match_is_not_a_failure():
    emb = np.array([[0.0], [0.2], [5.0], [5.1], [9.0], [0.15]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2, 3])  # classes 2 and 3 have one item: nothing to find
    nb = Evaluator(pairs=10).evaluate(emb, labels).neighbours
    assert nb.ids[:, 0].tolist() == [5, 5, 3, 2, 3, 1]
    # Item 0 finds class 3 first: a failure; items 4 and 5 cannot be right: none.
    assert nb.wrong.tolist() == [True, True, False, False, False, False]


def test_the_shown_queries_put_failures_first_and_spread_over_the_classes():
    labels = np.repeat(np.arange(4), 10)  # 40 queries, classes 0-3
    wrong = np.zeros(40, dtype=bool)
    wrong[[1, 2, 3, 12, 25]] = True  # failures: three of class 0, one of 1, one of 2
    nb = Neighbours(np.arange(40), np.zeros((40, 1), np.int64), np.zeros((40, 1)), wrong)
    rows = nb.pick(labels, 8)
    assert len(rows) == 8
    assert wrong[rows].tolist() == [True] * 4 + [False] * 4  # half the rows at most
    assert sorted(labels[rows[:3]].tolist()) == [0, 1, 2]  # each class before any twice
    # The correct ones go on with class 3, which no failure showed, then the others.
    assert labels[rows[4]] == 3 and sorted(labels[rows[4:]].tolist()) == [0, 1, 2, 3]
    # Few correct queries: the failures fill the rows.
    assert wrong[nb.pick(labels, 2)].tolist() == [True, False]
    only_wrong = Neighbours(np.arange(5), np.zeros((5, 1), np.int64), np.zeros((5, 1)), wrong[:5])
    assert wrong[:5][only_wrong.pick(labels[:5], 8)].tolist() == [True, True, True, False, False]


def test_draw_marks_the_threshold_and_draws_a_row_per_query():
    emb, labels = clustered(n_classes=4, per_class=8, seed=2)
    images = np.random.default_rng(0).random((len(labels), 1, 6, 6)).astype(np.float32)
    report = Evaluator(pairs=200).evaluate(emb, labels)
    names = ["zero", "one", "two", "three"]
    figures = Evaluator.draw(
        report, images=lambda rows: images[rows], class_names=names, max_queries=5, top_k=3
    )
    assert list(figures) == ["distances", "roc", "embeddings_2d", "retrieval"]
    (hist,) = figures["distances"].axes
    dashed = [ln for ln in hist.lines if isinstance(ln, Line2D) and ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_xdata()[0] == pytest.approx(report.threshold)
    (roc,) = figures["roc"].axes
    assert roc.get_xscale() == "log"
    assert any(f"threshold {report.threshold:.4g}" in t.get_text() for t in roc.get_legend().texts)
    (scatter,) = figures["embeddings_2d"].axes
    assert sorted(t.get_text() for t in scatter.get_legend().texts) == sorted(names)
    grid = figures["retrieval"]
    assert len(grid.axes) == 5 * (1 + 3)  # a query and its 3 neighbours, 5 rows
    rows = report.neighbours.pick(labels, 5)
    failures = int(report.neighbours.wrong[rows].sum())
    titles = [grid.axes[4 * r].get_title() for r in range(5)]
    assert [t.endswith("wrong top-1") for t in titles] == [True] * failures + [False] * (
        5 - failures
    )
    assert titles[0].startswith("query ") and titles[0].split()[1] in names
    assert f"the first {failures}: top-1 of another class" in grid.get_suptitle()
    # No images, no retrieval grid.
    assert list(Evaluator.draw(report)) == ["distances", "roc", "embeddings_2d"]
