"""N-way K-shot one-shot classification accuracy on embeddings (Koch et al. 2015 protocol).

An episode draws N classes, K support items of each and one query of one of them; the query
is classified as the class whose support (the mean support embedding when K > 1) is
nearest. Episodes are sampled and scored as whole arrays, so a seed fixes the result.

With ``groups`` (one group per item, e.g. Omniglot's alphabet) every episode first draws a
group, then its N classes within that group: Lake et al.'s within-alphabet tasks, which
Koch et al. report, harder than classes drawn across the whole split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from siamese.checks import check_int, check_labels, is_int, label_kind
from siamese.errors import ConfigError, DataError
from siamese.evaluation.arrays import as_embeddings, to_numpy

METRICS = ("l2", "ip")
# What an episode's classes share: nothing (any classes of the split), or the alphabet (the
# part of the class name before its last "/", e.g. Omniglot's "Greek/character05").
WITHIN = (None, "alphabet")

# scorer(query (B, 1, D), prototypes (B, N, D)) -> (B, N) distances, lower = closer: a model's
# own pair score (a learned head) instead of ``metric``.
Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Support embeddings gathered at once when scoring: (episodes, N, K, D) float64 elements,
# so memory stays near 16 MB whatever the episode count.
_CHUNK_ELEMENTS = 1 << 21
# Episodes are drawn and scored in chunks of about this many (episodes, N, K + 1) item
# indices (16 MB of int64 each array), so memory does not grow with the episode count.
_EPISODE_ELEMENTS = 1 << 21
# More episodes than this only cost time: the 95% interval is already within +-0.0003.
MAX_EPISODES = 10**7


class Episodes(NamedTuple):
    """Item indices of sampled episodes; position j of an episode is its j-th class."""

    support: np.ndarray  # (E, N, K) int64 indices into the labels
    query: np.ndarray  # (E,) int64 index of each episode's query
    target: np.ndarray  # (E,) int64 position in [0, N) of the query's class


def oneshot_accuracy(
    embeddings: Any,
    labels: Any,
    *,
    n_way: int = 5,
    k_shot: int = 1,
    episodes: int = 1000,
    seed: int = 0,
    metric: str = "l2",
    groups: Any = None,
) -> dict[str, float]:
    """Mean accuracy of nearest-support classification over random N-way K-shot episodes.

    Episodes come from :func:`sample_episodes`. The query goes to the class with the
    smallest euclidean distance ("l2") or the largest inner product ("ip"; normalise the
    embeddings first for cosine) to its support mean. Ties go to the class that comes first
    in the episode's class order, which is a random permutation drawn from the seed: the
    result stays deterministic, and a tie among m classes that include the target is won
    with probability 1/m, so a collapsed model (all embeddings equal) scores chance, 1/N.

    Args:
        embeddings: (M, D) embeddings of an evaluation split.
        labels: (M,) class labels; only classes with at least ``k_shot + 1`` items are used.
        n_way: classes per episode (N >= 2).
        k_shot: support items per class (K >= 1).
        episodes: number of episodes.
        seed: seed of the numpy Generator; the same seed gives the same result every call.
        metric: "l2" or "ip".
        groups: optional (M,) group of each item (every item of a class in one group): each
            episode's classes come from one group, drawn uniformly among the groups with
            ``n_way`` eligible classes.

    Returns:
        ``accuracy``; ``ci95``, the half-width of the normal-approximation 95% confidence
        interval, 1.96 * std / sqrt(episodes) with std = sqrt(p (1 - p)) the population
        standard deviation of the per-episode 0/1 outcomes (so it is 0 when every episode
        is right); ``episodes``, ``n_way`` and ``k_shot``, all as floats.
    """
    metric = _check_metric(metric)
    x = as_embeddings(embeddings, "embeddings", np.float64)
    y = _check_labels(labels, len(x))
    return _summary(
        _count_correct(x, y, n_way, k_shot, episodes, seed, groups, metric), n_way, k_shot
    )


def oneshot_metrics(
    embeddings: Any,
    labels: Any,
    *,
    ways: Sequence[int] = (5, 20),
    k_shot: int = 1,
    episodes: int = 1000,
    seed: int = 0,
    metric: str = "l2",
    scorer: Scorer | None = None,
    groups: Any = None,
) -> dict[str, float]:
    """One-shot accuracy for each N in ``ways`` that the split can support, as flat metrics.

    ``scorer`` (optional) replaces ``metric``: it gets the queries (B, 1, D) and the class
    prototypes (B, N, D) and returns (B, N) distances, e.g. Koch et al.'s learned L1 head.

    Each N runs :func:`oneshot_accuracy` with the same ``seed`` (and ``groups``). An N
    larger than the number of classes with at least ``k_shot + 1`` items (in the largest
    group, with ``groups``) is left out without a word (20-way on MNIST's 10 classes), so
    the result may be empty.

    Returns:
        ``oneshot_<N>way_<K>shot`` (accuracy) and ``oneshot_<N>way_<K>shot_ci95`` for each
        N that fits, in the order of ``ways``, and nothing else.
    """
    values = tuple(ways) if isinstance(ways, Sequence) else ()
    if not values or any(not is_int(n) or n < 2 for n in values):
        raise ConfigError(
            f"ways {ways!r} must be a non-empty sequence of integers >= 2, e.g. (5, 20)"
        )
    metric = _check_metric(metric)
    x = as_embeddings(embeddings, "embeddings", np.float64)
    y = _check_labels(labels, len(x))
    check_counts(2, k_shot, episodes, seed)
    eligible = _eligible_classes(y, int(k_shot))[0]
    grouped = _check_groups(groups, y)
    most = len(eligible)  # the most classes an episode can draw from
    if grouped is not None and most:
        most = int(np.bincount(grouped[eligible]).max())
    out: dict[str, float] = {}
    for n in dict.fromkeys(int(n) for n in values):
        if n > most:
            continue
        correct = _count_correct(x, y, n, k_shot, episodes, seed, groups, metric, scorer)
        summary = _summary(correct, n, k_shot)
        key = f"oneshot_{n}way_{int(k_shot)}shot"
        out[key] = summary["accuracy"]
        out[f"{key}_ci95"] = summary["ci95"]
    return out


def sample_episodes(
    labels: Any,
    n_way: int,
    k_shot: int,
    episodes: int,
    seed: int = 0,
    groups: Any = None,
) -> Episodes:
    """Draw N-way K-shot episodes as item indices, the same ones for the same seed.

    Each episode takes N distinct classes uniformly among those with at least K + 1 items
    (with ``groups``: first a group, uniformly among those with N such classes, then N of
    its classes uniformly), in a uniformly random order; K + 1 distinct items of each
    class, uniformly; the target position uniformly in [0, N). The first K items of every
    class are its support; the (K + 1)-th item of the target class is the query, so it
    never coincides with a support.
    """
    parts = list(_episode_chunks(labels, n_way, k_shot, episodes, seed, groups))
    if len(parts) == 1:
        return parts[0]
    return Episodes(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))


def _count_correct(
    x: np.ndarray,
    labels: np.ndarray,
    n_way: int,
    k_shot: int,
    episodes: int,
    seed: int,
    groups: Any,
    metric: str,
    scorer: Scorer | None = None,
) -> tuple[int, int]:
    """(episodes whose query went to its own class, episodes), drawn and scored in chunks."""
    correct = total = 0
    for eps in _episode_chunks(labels, n_way, k_shot, episodes, seed, groups):
        correct += int((_predict(x, eps, metric, scorer) == eps.target).sum())
        total += len(eps.target)
    return correct, total


def _episode_chunks(
    labels: Any, n_way: int, k_shot: int, episodes: int, seed: int, groups: Any
) -> Iterator[Episodes]:
    """The episodes of :func:`sample_episodes`, a bounded number at a time.

    The first chunk draws from ``default_rng(seed)``, as all episodes were drawn at once
    before chunking, so every count up to a chunk gets the same episodes as then; each
    later chunk draws from its own stream spawned from ``seed``.
    """
    labels = _check_labels(labels, None)
    check_counts(n_way, k_shot, episodes, seed)
    n_way, k_shot, episodes = int(n_way), int(k_shot), int(episodes)
    eligible, counts, starts, by_class = _eligible_classes(labels, k_shot)
    class_group = _check_groups(groups, labels)
    if n_way > len(eligible):
        raise ConfigError(
            f"n_way={n_way} needs {n_way} classes with at least k_shot + 1 = {k_shot + 1} "
            f"items, but the split has only {len(eligible)}; use n_way <= {len(eligible)} "
            "(or a smaller k_shot)"
        )
    if class_group is not None:
        # The eligible classes listed group after group; an episode draws a group with
        # N of them, then N positions within the group's stretch of that list.
        in_group = class_group[eligible]
        listed = eligible[np.argsort(in_group, kind="stable")]
        sizes = np.bincount(in_group)
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        usable = np.flatnonzero(sizes >= n_way)
        if len(usable) == 0:
            raise ConfigError(
                f"n_way={n_way} within a group needs a group with {n_way} classes of at least "
                f"k_shot + 1 = {k_shot + 1} items, but the largest has {int(sizes.max())}; "
                f"use n_way <= {int(sizes.max())} (or episodes across groups)"
            )

    step = max(1, _EPISODE_ELEMENTS // (n_way * (k_shot + 1)))
    for chunk, begin in enumerate(range(0, episodes, step)):
        size = min(step, episodes - begin)
        rng = np.random.default_rng(
            seed if chunk == 0 else np.random.SeedSequence(seed, spawn_key=(chunk,))
        )
        # N distinct classes per episode, then shuffled so the class order is uniform too.
        if class_group is None:
            picked = _floyd_sample(rng, np.full(size, len(eligible)), n_way)  # (E, N)
            picked = np.take_along_axis(picked, rng.random(picked.shape).argsort(axis=1), axis=1)
            classes = eligible[picked]  # (E, N) class codes
        else:
            group = usable[rng.integers(0, len(usable), size=size)]  # (E,)
            picked = _floyd_sample(rng, sizes[group], n_way)  # (E, N) within the group
            picked = np.take_along_axis(picked, rng.random(picked.shape).argsort(axis=1), axis=1)
            classes = listed[first[group][:, None] + picked]
        # K + 1 distinct positions within each class, shuffled, so any can be the query.
        pos = _floyd_sample(rng, counts[classes], k_shot + 1)  # (E, N, K + 1)
        pos = np.take_along_axis(pos, rng.random(pos.shape).argsort(axis=2), axis=2)
        items = by_class[starts[classes][..., None] + pos]  # (E, N, K + 1)
        target = rng.integers(0, n_way, size=size)
        query = items[np.arange(size), target, k_shot]
        del picked, classes, pos  # freed while the caller scores this chunk
        yield Episodes(support=items[..., :k_shot], query=query, target=target)


def predict_episodes(embeddings: Any, episodes: Episodes, *, metric: str = "l2") -> np.ndarray:
    """(E,) position of the class each episode's query is assigned to (first among ties)."""
    return _predict(
        as_embeddings(embeddings, "embeddings", np.float64), episodes, _check_metric(metric)
    )


def _predict(
    x: np.ndarray, episodes: Episodes, metric: str, scorer: Scorer | None = None
) -> np.ndarray:
    support, query = episodes.support, episodes.query
    n_episodes, n_way, k_shot = support.shape
    pred = np.empty(n_episodes, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // (n_way * k_shot * x.shape[1]))
    for s in range(0, n_episodes, step):
        proto = x[support[s : s + step]].mean(axis=2)  # (B, N, D)
        q = x[query[s : s + step]][:, None, :]  # (B, 1, D)
        # Element-wise then a last-axis sum: identical prototypes get bit-identical scores,
        # so exact ties really tie and argmin's first-index rule decides them. Squared l2
        # keeps the order without a sqrt; ip is negated so that smaller is closer for both.
        if scorer is not None:
            scores = np.asarray(scorer(q, proto), dtype=np.float64)
            if scores.shape != proto.shape[:2]:
                raise DataError(
                    f"scorer returned shape {scores.shape}; expected {proto.shape[:2]} "
                    "(episodes, N) distances"
                )
        elif metric == "l2":
            scores = ((proto - q) ** 2).sum(axis=2)
        else:
            scores = -(proto * q).sum(axis=2)
        pred[s : s + step] = scores.argmin(axis=1)
    return pred


def _floyd_sample(rng: np.random.Generator, sizes: np.ndarray, m: int) -> np.ndarray:
    """``sizes.shape + (m,)`` draws, m distinct ints uniformly from [0, size) for each entry.

    Floyd's algorithm, vectorised: memory grows with m, not with the population size.
    """
    out = np.empty((*sizes.shape, m), dtype=np.int64)
    for i in range(m):
        j = sizes - m + i  # the population grows by one each step, up to size - 1
        t = rng.integers(0, j + 1)
        seen = (out[..., :i] == t[..., None]).any(axis=-1)
        # j itself cannot be taken yet: every earlier draw was <= j - 1.
        out[..., i] = np.where(seen, j, t)
    return out


def _eligible_classes(
    labels: np.ndarray, k_shot: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(eligible class codes, items per class, first slot per class, items sorted by class)."""
    _, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    by_class = np.argsort(codes, kind="stable")
    return np.flatnonzero(counts >= k_shot + 1), counts, starts, by_class


def class_groups(
    classes: Sequence[str], within: str | None, key: str = "within"
) -> np.ndarray | None:
    """(C,) group code of each class name for episodes ``within`` WITHIN: None for none;
    "alphabet": the part of the name before its last "/" (Omniglot's "Greek/character05").
    ``key`` names the setting in error messages."""
    if within not in WITHIN:
        raise ConfigError(
            f"{key}={within!r} is unknown; use null (one-shot classes across the split) or "
            "alphabet (classes of one alphabet, as Lake's and Koch's 20-way tasks)"
        )
    if within is None:
        return None
    flat = [name for name in classes if "/" not in str(name)]
    if flat:
        raise ConfigError(
            f"{key}=alphabet needs class names of the form alphabet/character, but "
            f"{len(flat)} of the {len(classes)} classes have none (e.g. {str(flat[0])!r}); "
            f"use {key}=null for this data"
        )
    _, codes = np.unique([str(name).rsplit("/", 1)[0] for name in classes], return_inverse=True)
    return codes.reshape(-1).astype(np.int64)


def _check_groups(groups: Any, labels: np.ndarray) -> np.ndarray | None:
    """(C,) group code of each class code (np.unique order of ``labels``) from per-item
    ``groups``, or None; refuses a class whose items are in several groups."""
    if groups is None:
        return None
    g = to_numpy(groups).reshape(-1)
    if len(g) != len(labels):
        raise DataError(
            f"groups has {len(g)} entries but labels has {len(labels)}; pass one group per item"
        )
    _, codes = np.unique(labels, return_inverse=True)
    _, gcodes = np.unique(g, return_inverse=True)
    codes, gcodes = codes.reshape(-1), gcodes.reshape(-1)
    per_class = np.full(codes.max() + 1, -1, dtype=np.int64)
    per_class[codes] = gcodes
    if not np.array_equal(per_class[codes], gcodes):
        bad = labels[np.flatnonzero(per_class[codes] != gcodes)[0]].item()
        raise DataError(f"class {bad!r} has items in more than one group; give a class one group")
    return per_class


def _summary(counts: tuple[int, int], n_way: int, k_shot: int) -> dict[str, float]:
    """The metrics of ``counts``: (episodes right, episodes)."""
    right, n = counts
    p = right / n
    return {
        "accuracy": p,
        "ci95": 1.96 * math.sqrt(p * (1.0 - p)) / math.sqrt(n),
        "episodes": float(n),
        "n_way": float(n_way),
        "k_shot": float(k_shot),
    }


def check_counts(n_way: int, k_shot: int, episodes: int, seed: int) -> None:
    """Refuse episode settings that cannot be drawn (or would take forever), in one line."""
    check_int("n_way", n_way, 2, ", e.g. 5")
    check_int("k_shot", k_shot, 1, ", e.g. 1", expected="an integer >= 1")
    check_int("episodes", episodes, 1, ", e.g. 1000", expected="an integer >= 1")
    if episodes > MAX_EPISODES:
        raise ConfigError(
            f"episodes={episodes} is more than {MAX_EPISODES:,}, which already pins the "
            "accuracy's 95% interval within +-0.0003 and more only costs time; use fewer, "
            "e.g. 10000"
        )
    check_int("seed", seed, 0, ", e.g. 0")


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(
            f"metric {metric!r} is not supported; expected one of {METRICS} "
            "(normalise the embeddings and use 'ip' for cosine)"
        )
    return metric


def _check_labels(labels: Any, n: int | None) -> np.ndarray:
    y = check_labels(to_numpy(labels), n)
    label_kind(y, "labels")  # NaN would be one class, a mix of kinds a TypeError
    return y
