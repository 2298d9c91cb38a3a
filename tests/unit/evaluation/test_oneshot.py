"""One-shot episodes: hand-placed clusters, episode validity, and a loop implementation."""

from __future__ import annotations

import hashlib
import math
import tracemalloc

import numpy as np
import pytest
import torch

from siamese.errors import ConfigError, DataError
from siamese.evaluation import oneshot
from siamese.evaluation.oneshot import (
    Episodes,
    class_groups,
    oneshot_accuracy,
    oneshot_metrics,
    predict_episodes,
    sample_episodes,
)


def clusters(n_classes: int, per_class: int, dim: int = 4, spread: float = 1e-3, seed: int = 0):
    """Tight clusters around far-apart centres: every episode must be answered right."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)) * 100
    labels = np.repeat(np.arange(n_classes), per_class)
    emb = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    return emb, labels


def loop_predictions(emb, eps: Episodes, metric: str) -> np.ndarray:
    """The definition, one episode and one class at a time."""
    pred = []
    for support, query in zip(eps.support, eps.query, strict=True):
        q = emb[query]
        scores = []
        for items in support:
            proto = emb[items].mean(axis=0)
            if metric == "l2":
                scores.append(-np.linalg.norm(q - proto))
            else:
                scores.append(float(q @ proto))
        pred.append(int(np.argmax(scores)))
    return np.array(pred)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k_shot", [1, 3])
def test_tight_clusters_are_always_right(metric, k_shot):
    emb, labels = clusters(8, 5)
    if metric == "ip":
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    got = oneshot_accuracy(emb, labels, n_way=5, k_shot=k_shot, episodes=300, metric=metric)
    assert got == {"accuracy": 1.0, "ci95": 0.0, "episodes": 300.0, "n_way": 5.0, "k_shot": k_shot}


def test_a_class_that_always_fails():
    # 1-D points, five classes, so every 5-way episode holds all of them. Class 4 has one
    # item at 0 and one at 100: its query sits on the other item's far side, nearer class 0
    # (at 1) or class 3 (at 99), so exactly the episodes whose target is class 4 fail.
    #   class: 0      1       2       3       4
    #   items: 1, 1   30, 30  60, 60  99, 99  0, 100
    emb = np.array([[1.0], [1], [30], [30], [60], [60], [99], [99], [0], [100]])
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    eps = sample_episodes(labels, 5, 1, 500, seed=3)
    fails = labels[eps.query] == 4
    assert 0.1 < fails.mean() < 0.3  # the target class is uniform among the five
    got = oneshot_accuracy(emb, labels, n_way=5, episodes=500, seed=3)
    p = 1 - fails.mean()
    assert got["accuracy"] == p
    std = math.sqrt(sum((float(ok) - p) ** 2 for ok in ~fails) / 500)  # population std
    assert got["ci95"] == pytest.approx(1.96 * std / math.sqrt(500), rel=1e-12)


def test_support_mean_decides_with_k_above_one():
    # Class 0 supports at 0 and 10 (mean 5), class 1 at 6 and 6; a query at 4.5 is nearer
    # class 1's nearest item (1.5 < 4.5) but nearer class 0's mean (0.5 < 1.5).
    emb = np.array([[0.0], [10], [6], [6], [4.5]])
    eps = Episodes(support=np.array([[[0, 1], [2, 3]]]), query=np.array([4]), target=np.array([0]))
    assert predict_episodes(emb, eps).tolist() == [0]


def test_metric_ip_takes_the_largest_inner_product():
    # Query (1, 0): support A = (10, 0) has inner product 10 and distance 9, support
    # B = (1, 0.1) inner product 1 and distance 0.1.
    emb = np.array([[10.0, 0], [1, 0.1], [1, 0]])
    eps = Episodes(support=np.array([[[0], [1]]]), query=np.array([2]), target=np.array([0]))
    assert predict_episodes(emb, eps, metric="ip").tolist() == [0]
    assert predict_episodes(emb, eps, metric="l2").tolist() == [1]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k_shot", [1, 3])
def test_matches_a_loop_on_random_data(metric, k_shot):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    labels = rng.integers(0, 25, 300)
    eps = sample_episodes(labels, 10, k_shot, 200, seed=5)
    expected = loop_predictions(emb.astype(np.float64), eps, metric)
    np.testing.assert_array_equal(predict_episodes(emb, eps, metric=metric), expected)
    got = oneshot_accuracy(
        torch.from_numpy(emb), labels, n_way=10, k_shot=k_shot, episodes=200, seed=5, metric=metric
    )
    assert got["accuracy"] == np.mean(expected == eps.target)
    assert 0.0 < got["accuracy"] < 0.5  # random embeddings: near chance, 1/10


def test_episodes_are_valid():
    rng = np.random.default_rng(2)
    # Classes 0-9 have 3-9 items, class 10 has 2 and class 11 has 1: with k_shot=2 neither
    # of the last two may appear.
    labels = np.concatenate([np.repeat(np.arange(10), rng.integers(3, 10, 10)), [10, 10, 11]])
    labels = rng.permutation(labels)
    eps = sample_episodes(labels, 6, 2, 2000, seed=0)
    assert eps.support.shape == (2000, 6, 2)
    assert eps.query.shape == eps.target.shape == (2000,)

    support_labels = labels[eps.support]  # (E, N, K)
    assert (support_labels == support_labels[..., :1]).all()  # one class per slot
    classes = support_labels[..., 0]  # (E, N)
    assert (np.sort(classes, axis=1)[:, 1:] != np.sort(classes, axis=1)[:, :-1]).all()
    assert set(np.unique(classes)) == set(range(10))  # every eligible class, no other
    assert (labels[eps.query] == classes[np.arange(2000), eps.target]).all()
    # Supports of a slot are distinct items, and the query is none of them.
    assert (eps.support[..., 0] != eps.support[..., 1]).all()
    assert not (eps.support == eps.query[:, None, None]).any()
    # Target positions are uniform over the slots.
    counts = np.bincount(eps.target, minlength=6)
    assert counts.min() > 2000 / 6 * 0.8


def test_query_and_supports_are_uniform_within_a_class():
    # Two classes of three items, 1-shot 2-way: the query of class 0 must be each of its
    # three items about equally often (an ordered draw could favour one position).
    labels = np.array([0, 0, 0, 1, 1, 1])
    eps = sample_episodes(labels, 2, 1, 6000, seed=0)
    class0 = labels[eps.query] == 0
    freq = np.bincount(eps.query[class0], minlength=3) / class0.sum()
    assert np.abs(freq - 1 / 3).max() < 0.03
    freq = np.bincount(eps.support[..., 0].ravel(), minlength=6) / eps.support.size
    assert np.abs(freq - 1 / 6).max() < 0.02


def test_same_seed_same_result():
    rng = np.random.default_rng(4)
    emb, labels = rng.standard_normal((200, 8)), rng.integers(0, 12, 200)
    a = sample_episodes(labels, 5, 1, 100, seed=7)
    b = sample_episodes(labels, 5, 1, 100, seed=7)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    first = oneshot_accuracy(emb, labels, episodes=500, seed=7)
    assert oneshot_accuracy(emb, labels, episodes=500, seed=7) == first
    assert oneshot_accuracy(emb, labels, episodes=500, seed=8) != first


def test_ties_go_to_the_first_class_of_a_random_order():
    # All embeddings equal: every class ties, the first slot wins, and since the target's
    # slot is uniform the accuracy is chance, not 0 or 1.
    labels = np.repeat(np.arange(10), 3)
    emb = np.zeros((30, 4))
    eps = sample_episodes(labels, 5, 1, 1000, seed=0)
    got = oneshot_accuracy(emb, labels, n_way=5, episodes=1000, seed=0)
    assert got["accuracy"] == np.mean(eps.target == 0)
    assert 0.15 < got["accuracy"] < 0.25


def test_oneshot_metrics_keys():
    emb, labels = clusters(10, 3)  # MNIST-like: 10 classes
    assert oneshot_metrics(emb, labels, episodes=50) == {
        "oneshot_5way_1shot": 1.0,
        "oneshot_5way_1shot_ci95": 0.0,
    }
    emb, labels = clusters(25, 4)
    got = oneshot_metrics(emb, labels, ways=(20, 5), k_shot=2, episodes=50, seed=1)
    assert list(got) == [
        "oneshot_20way_2shot",
        "oneshot_20way_2shot_ci95",
        "oneshot_5way_2shot",
        "oneshot_5way_2shot_ci95",
    ]
    emb, labels = clusters(4, 3)  # fewer than 5 classes: nothing fits
    assert oneshot_metrics(emb, labels) == {}


def test_oneshot_metrics_equal_oneshot_accuracy():
    rng = np.random.default_rng(6)
    emb, labels = rng.standard_normal((400, 8)), rng.integers(0, 30, 400)
    got = oneshot_metrics(emb, labels, episodes=300, seed=2, metric="ip")
    for n in (5, 20):
        one = oneshot_accuracy(emb, labels, n_way=n, episodes=300, seed=2, metric="ip")
        assert got[f"oneshot_{n}way_1shot"] == one["accuracy"]
        assert got[f"oneshot_{n}way_1shot_ci95"] == one["ci95"]


def test_twenty_way_on_random_embeddings_is_at_chance():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((10_000, 64)).astype(np.float32)
    labels = rng.integers(0, 200, 10_000)
    out = oneshot_accuracy(emb, labels, n_way=20, episodes=1000)
    # Embeddings that know nothing of the classes score 1/20 within a few standard errors.
    assert abs(out["accuracy"] - 0.05) < 4 * math.sqrt(0.05 * 0.95 / 1000)


def test_nan_embeddings():
    emb, labels = clusters(6, 3)
    emb[[1, 4], 0] = np.nan
    with pytest.raises(DataError, match="2 non-finite values"):
        oneshot_accuracy(emb, labels)


@pytest.mark.parametrize(
    ("emb", "labels", "match"),
    [
        (np.zeros((6, 2)), np.zeros(5), "labels has shape \\(5,\\) but embeddings has 6 rows"),
        (np.zeros(6), np.zeros(6), "expected a non-empty 2-D array"),
        (np.zeros((6, 2)), np.zeros((6, 1)), "1-D array"),
    ],
)
def test_bad_shapes(emb, labels, match):
    with pytest.raises(DataError, match=match):
        oneshot_accuracy(emb, labels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_way": 1}, "n_way 1 must be an integer >= 2"),
        ({"k_shot": 0}, "k_shot 0 must be an integer >= 1"),
        ({"episodes": 0}, "episodes 0 must be an integer >= 1"),
        ({"seed": -1}, "seed -1"),
        ({"metric": "cosine"}, "normalise the embeddings and use 'ip'"),
    ],
)
def test_bad_config(kwargs, match):
    emb, labels = clusters(6, 3)
    with pytest.raises(ConfigError, match=match):
        oneshot_accuracy(emb, labels, **kwargs)


def test_more_ways_than_classes():
    emb, labels = clusters(6, 3)
    labels[:2] = 99  # class 99 has 2 items, class 0 one left: 5 classes have >= 3 items
    with pytest.raises(ConfigError, match="n_way=20 needs 20 classes") as err:
        oneshot_accuracy(emb, labels, n_way=20)
    assert "only 6" in str(err.value) and "n_way <= 6" in str(err.value)
    with pytest.raises(ConfigError, match="only 5; use n_way <= 5"):
        oneshot_accuracy(emb, labels, n_way=6, k_shot=2)


def test_bad_ways():
    emb, labels = clusters(6, 3)
    with pytest.raises(ConfigError, match="ways"):
        oneshot_metrics(emb, labels, ways=(1, 5))
    with pytest.raises(ConfigError, match="ways"):
        oneshot_metrics(emb, labels, ways=())


def test_a_scorer_replaces_the_metric():
    """A model's own pair score (Koch's head) decides; here one that prefers far classes."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5)
    emb = np.eye(6)[labels] * 10 + rng.normal(0, 0.01, (30, 6))  # tight, far-apart clusters

    def squared_l2(q, proto):
        assert q.shape[1] == 1 and q.shape[0] == proto.shape[0]
        return ((proto - q) ** 2).sum(axis=2)

    plain = oneshot_metrics(emb, labels, ways=(5,), episodes=200)
    same = oneshot_metrics(emb, labels, ways=(5,), episodes=200, scorer=squared_l2)
    assert plain == same and plain["oneshot_5way_1shot"] == 1.0
    farthest = oneshot_metrics(
        emb, labels, ways=(5,), episodes=200, scorer=lambda q, p: -squared_l2(q, p)
    )
    assert farthest["oneshot_5way_1shot"] == 0.0
    with pytest.raises(DataError, match="scorer returned shape"):
        oneshot_metrics(
            emb, labels, ways=(5,), episodes=10, scorer=lambda q, p: p.sum(axis=2)[:, :1]
        )


def test_a_learned_head_scores_one_shot_episodes_with_its_logits():
    from siamese.module import SiameseModule

    def module(distance):
        return SiameseModule(
            tower={
                "_target_": "siamese.models.ConvTower",
                "layers": [],
                "embedding_dim": 4,
                "in_channels": 1,
                "image_size": [2, 2],
                "input_mean": 0.0,
                "input_std": 1.0,
            },
            distance=distance,
            loss={"_target_": "siamese.losses.ContrastiveLoss"},
            optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        )

    assert module({"_target_": "siamese.distances.EuclideanDistance"}).episode_scorer() is None
    learned = module({"_target_": "siamese.distances.LearnedDistance", "embedding_dim": 4})
    with torch.no_grad():
        learned.distance.head.weight.copy_(torch.tensor([[-1.0, -2.0, 0.0, 0.5]]))
        learned.distance.head.bias.fill_(0.25)
    q = np.array([[[1.0, 0.0, 2.0, 1.0]]])  # (1, 1, D)
    proto = np.array([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 2.0, 3.0]]])  # (1, 2, D)
    # logit = 0.25 - |dq0| - 2|dq1| + 0.5|dq3|; distance = -logit
    expected = -np.array([[0.25 - 1 + 0.5, 0.25 - 2 + 1.0]])
    np.testing.assert_allclose(learned.episode_scorer()(q, proto), expected, rtol=1e-6)


def grouped_labels(seed: int = 0):
    """Group 0 has classes 0-5, group 1 classes 6-8, group 2 classes 9-13 of which class 13
    has one item (never eligible): with n_way=4 only groups 0 and 2 (4 eligible) qualify."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.repeat(np.arange(13), rng.integers(2, 6, 13)), [13]])
    group_of_class = np.array([0] * 6 + [1] * 3 + [2] * 5)
    order = rng.permutation(len(labels))
    return labels[order], group_of_class[labels[order]]


def test_episodes_within_groups_draw_their_classes_from_one_group():
    labels, groups = grouped_labels()
    eps = sample_episodes(labels, 4, 1, 4000, seed=1, groups=groups)
    classes = labels[eps.support[..., 0]]  # (E, 4)
    episode_groups = groups[eps.support[..., 0]]
    assert (episode_groups == episode_groups[:, :1]).all()  # one group per episode
    assert (labels[eps.query] == classes[np.arange(4000), eps.target]).all()
    assert (np.sort(classes, axis=1)[:, 1:] != np.sort(classes, axis=1)[:, :-1]).all()
    # Group 1 has 3 classes: never drawn; groups 0 and 2 each about half the episodes.
    share = np.bincount(episode_groups[:, 0], minlength=3) / 4000
    assert share[1] == 0 and abs(share[0] - 0.5) < 0.03
    # Every eligible class of those groups appears, class 13 (one item) never; group 2's
    # four eligible classes are all in each of its episodes.
    assert set(np.unique(classes)) == set(range(6)) | {9, 10, 11, 12}
    assert (np.sort(classes[episode_groups[:, 0] == 2], axis=1) == [9, 10, 11, 12]).all()
    # Group 0: 4 of 6 classes, each in about 4/6 of its episodes.
    in0 = classes[episode_groups[:, 0] == 0]
    freq = np.bincount(in0.ravel(), minlength=6)[:6] / len(in0)
    assert np.abs(freq - 4 / 6).max() < 0.04
    again = sample_episodes(labels, 4, 1, 4000, seed=1, groups=groups)
    assert all(np.array_equal(a, b) for a, b in zip(eps, again, strict=True))


def test_within_group_episodes_are_harder_by_the_hand_computed_amount():
    # 1-D, two groups far apart, each of two classes: class a at {0, 1}, class b at {3, 100}
    # (+1000 for the second group). 2-way 1-shot within a group is always {a, b}:
    # - target a: the query (0 or 1) is nearer the other a item (distance 1) than any b
    #   item (2 or more): always right;
    # - target b: query 3 with support 100 (97 away) loses to a's support (2 or 3 away);
    #   query 100 with support 3 wins (97 against 99 or 100): right half the time.
    # Within: 0.5 + 0.5 * 0.5 = 0.75. Across the split a 2-way episode draws 2 of the 4
    # classes: the 2 same-group pairs score 0.75, the 4 cross-group pairs always 1.0, so
    # (2 * 0.75 + 4) / 6 = 0.9167.
    points = np.array([0.0, 1.0, 3.0, 100.0])
    emb = np.concatenate([points, points + 1000.0])[:, None]
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    groups = labels // 2
    within = oneshot_accuracy(emb, labels, n_way=2, episodes=8000, seed=0, groups=groups)
    across = oneshot_accuracy(emb, labels, n_way=2, episodes=8000, seed=0)
    assert within["accuracy"] == pytest.approx(0.75, abs=0.015)
    assert across["accuracy"] == pytest.approx(11 / 12, abs=0.01)


def test_class_groups_from_alphabet_names():
    names = ["Greek/c01", "Latin/c01", "Greek/c02", "Old/Runic/c01"]
    assert class_groups(names, None) is None
    # Greek, Latin, Old/Runic (the part before the last "/"), numbered in sorted order.
    assert class_groups(names, "alphabet").tolist() == [0, 1, 0, 2]
    with pytest.raises(ConfigError, match=r"2 of the 3 classes have none \(e.g. '3'\)"):
        class_groups(["Greek/c01", "3", "4"], "alphabet")
    with pytest.raises(ConfigError, match=r"within='script' is unknown; use null"):
        class_groups(names, "script")


def test_group_checks_and_ways_that_no_group_can_hold():
    labels, groups = grouped_labels()
    emb = np.random.default_rng(0).standard_normal((len(labels), 3))
    # The largest group has 6 eligible classes: 5-way fits, 7- and 20-way are left out.
    got = oneshot_metrics(emb, labels, ways=(5, 7, 20), episodes=50, groups=groups)
    assert list(got) == ["oneshot_5way_1shot", "oneshot_5way_1shot_ci95"]
    with pytest.raises(ConfigError, match="the largest has 6; use n_way <= 6"):
        sample_episodes(labels, 7, 1, 10, groups=groups)
    split = groups.copy()
    split[np.flatnonzero(labels == 0)[0]] = 2  # one item of class 0 in another group
    with pytest.raises(DataError, match="class 0 has items in more than one group"):
        sample_episodes(labels, 4, 1, 10, groups=split)
    with pytest.raises(DataError, match="groups has 3 entries but labels has"):
        sample_episodes(labels, 4, 1, 10, groups=[0, 1, 2])


def mixed_clusters():
    """Overlapping clusters, 30 classes of 6 in 3 groups: accuracies well inside (0, 1)."""
    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(30), 6)
    emb = rng.normal(size=(180, 8)) + 0.8 * rng.normal(size=(30, 8))[labels]
    return emb, labels, labels // 10


def test_chunked_episodes_give_the_numbers_of_the_unchunked_sampler():
    # Computed by the sampler that drew all episodes in one array (before chunking).
    emb, labels, groups = mixed_clusters()
    assert oneshot_metrics(emb, labels, ways=(5, 20), episodes=3000, seed=4) == {
        "oneshot_5way_1shot": 0.433,
        "oneshot_5way_1shot_ci95": 0.01773090576366588,
        "oneshot_20way_1shot": 0.15666666666666668,
        "oneshot_20way_1shot_ci95": 0.013007186845341679,
    }
    got = oneshot_metrics(
        emb, labels, ways=(5, 10), k_shot=3, episodes=2000, seed=9, metric="ip", groups=groups
    )
    assert got == {
        "oneshot_5way_3shot": 0.572,
        "oneshot_5way_3shot_ci95": 0.021685077191469712,
        "oneshot_10way_3shot": 0.3835,
        "oneshot_10way_3shot_ci95": 0.021310336041461195,
    }
    eps = sample_episodes(labels, 20, 2, 5000, seed=1)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in eps))
    assert digest.hexdigest()[:16] == "9410b3a1df1a0851"


def test_many_episodes_are_drawn_and_scored_in_bounded_memory(monkeypatch):
    emb, labels, groups = mixed_clusters()
    first = sample_episodes(labels, 5, 1, 300, seed=3, groups=groups)
    monkeypatch.setattr(oneshot, "_EPISODE_ELEMENTS", 5 * 2 * 300)  # 300 episodes a chunk
    chunked = sample_episodes(labels, 5, 1, 2000, seed=3, groups=groups)
    # The first chunk is what one draw of its size gives; the later ones come from their
    # own streams, valid episodes all the same, and the same for the same seed.
    for a, b in zip(first, chunked, strict=True):
        assert len(b) == 2000 and np.array_equal(a, b[:300])
    again = sample_episodes(labels, 5, 1, 2000, seed=3, groups=groups)
    for a, b in zip(chunked, again, strict=True):
        assert np.array_equal(a, b)
    classes = np.sort(labels[chunked.support[:, :, 0]], axis=1)  # (E, N), distinct
    assert (classes[:, 1:] != classes[:, :-1]).all()
    in_group = groups[chunked.support[:, :, 0]]
    assert (in_group.min(axis=1) == in_group.max(axis=1)).all()
    target_class = labels[chunked.support[np.arange(2000), chunked.target, 0]]
    assert (labels[chunked.query] == target_class).all()
    # Streaming counts equal scoring the concatenated episodes.
    right = predict_episodes(emb, chunked) == chunked.target
    got = oneshot_accuracy(emb, labels, n_way=5, episodes=2000, seed=3, groups=groups)
    assert got["accuracy"] == right.mean() and got["episodes"] == 2000.0

    # Memory follows the chunk, not the episode count (one array of them was ~60 MB).
    monkeypatch.setattr(oneshot, "_EPISODE_ELEMENTS", 1 << 14)
    tracemalloc.start()
    try:
        oneshot_accuracy(emb, labels, n_way=5, episodes=100_000, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak


def test_absurd_episode_counts_are_refused_in_one_line():
    emb, labels, _ = mixed_clusters()
    for call in (
        lambda: oneshot_metrics(emb, labels, episodes=10**9),
        lambda: oneshot_accuracy(emb, labels, episodes=10**9),
        lambda: sample_episodes(labels, 5, 1, 10**9),
    ):
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value).startswith("episodes=1000000000 is more than 10,000,000")
        assert "use fewer" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.full(20, np.nan), "labels has 20 NaN value"),
        (np.array([1, "a"] * 10, dtype=object), "labels mixes numbers and strings"),
    ],
)
def test_labels_that_name_no_class_are_refused_in_one_line(labels, message):
    with pytest.raises(DataError, match=message):
        oneshot_metrics(np.random.default_rng(0).random((20, 4)), labels)
