"""Losses on hand-placed embeddings, against explicit loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import circle

from siamese.distances import CosineSimilarity, EuclideanDistance, LearnedDistance
from siamese.errors import ConfigError
from siamese.losses import BCELoss, ContrastiveLoss, MultiSimilarityLoss, TripletLoss

# Six points on the unit circle, two classes that mostly sit on opposite sides.
EMB = circle([0, 30, 200, 180, 150, 100])


LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def contrastive_by_loop(emb, labels, dist_fn, margin, pos_margin=0.0, reduction="nonzero"):
    pos, neg = [], []
    for i, j in itertools.combinations(range(len(emb)), 2):
        d = dist_fn(emb[i], emb[j])
        if labels[i] == labels[j]:
            pos.append(max(d - pos_margin, 0.0) ** 2)
        else:
            neg.append(max(margin - d, 0.0) ** 2)
    if reduction == "mean":
        return sum(pos) / len(pos) + sum(neg) / len(neg)
    mean_nonzero = lambda xs: sum(xs) / max(1, sum(x > 0 for x in xs))  # noqa: E731
    return mean_nonzero(pos) + mean_nonzero(neg)


@pytest.mark.parametrize(
    ("distance", "dist_fn", "margin"),
    [
        (EuclideanDistance(), lambda a, b: float((a - b).norm()), 1.5),
        (CosineSimilarity(), lambda a, b: 1.0 - float(a @ b), 1.2),
    ],
)
def test_contrastive_matches_explicit_loop(distance, dist_fn, margin):
    emb = EMB.clone().requires_grad_(True)
    out = ContrastiveLoss(distance, margin=margin, pos_margin=0.1)(emb, LABELS)
    expected = contrastive_by_loop(EMB, LABELS, dist_fn, margin, pos_margin=0.1)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_contrastive_mean_reduction_counts_every_pair():
    dist_fn = lambda a, b: float((a - b).norm())  # noqa: E731
    loss = ContrastiveLoss(EuclideanDistance(), margin=1.5, reduction="mean")
    expected = contrastive_by_loop(EMB, LABELS, dist_fn, 1.5, reduction="mean")
    assert loss(EMB, LABELS).loss.item() == pytest.approx(expected, rel=1e-6)
    nonzero = ContrastiveLoss(EuclideanDistance(), margin=1.5)(EMB, LABELS).loss.item()
    assert nonzero > expected  # some different pairs are past the margin and count as zeros


def test_contrastive_explicit_pairs_and_hand_value():
    # Pair 1: same, d = 0.5 -> 0.25. Pair 2: different, d = 0.2, margin 1 -> 0.64.
    e1 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    e2 = torch.tensor([[0.3, 0.4], [0.0, 0.2]])
    loss = ContrastiveLoss(EuclideanDistance(normalize_embeddings=False), margin=1.0)
    out = loss.forward_pairs(e1, e2, torch.tensor([True, False]))
    assert out.loss.item() == pytest.approx(0.25 + 0.64)
    assert out.pos_distance.item() == pytest.approx(0.5)
    assert out.neg_distance.item() == pytest.approx(0.2)
    assert out.active_fraction.item() == 1.0


def test_contrastive_with_no_different_pair_still_has_a_gradient():
    emb = EMB[:3].clone().requires_grad_(True)
    out = ContrastiveLoss(EuclideanDistance())(emb, torch.zeros(3, dtype=torch.long))
    out.loss.backward()
    assert out.neg_distance.item() == 0.0 and out.loss.item() > 0
    assert torch.isfinite(emb.grad).all()


def test_contrastive_nonzero_counts_pairs_by_their_margins():
    # Class 0: two copies of (1, 0); class 1: (0, 1) and (-1, 0). By hand, margin 1.5:
    # same (0,1) d = 0: inside pos_margin 0, not counted; same (2,3) d = sqrt 2: 2.
    # different (0,2), (1,2) d = sqrt 2 < 1.5: (1.5 - sqrt 2)^2 each; (0,3), (1,3) d = 2: 0.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    near = (1.5 - math.sqrt(2)) ** 2
    out = ContrastiveLoss(EuclideanDistance(), margin=1.5)(emb, labels)
    assert out.loss.item() == pytest.approx(2.0 + near, rel=1e-6)
    assert out.active_fraction.item() == pytest.approx(3 / 6)
    out.loss.backward()
    assert torch.isfinite(emb.grad).all()
    mean = ContrastiveLoss(EuclideanDistance(), margin=1.5, reduction="mean")(emb, labels)
    assert mean.loss.item() == pytest.approx((0 + 2) / 2 + 2 * near / 4, rel=1e-6)
    assert mean.active_fraction.item() == pytest.approx(3 / 6)
    # A same pair inside pos_margin counts for nothing: (2,3) at sqrt 2 < 1.45.
    inside = ContrastiveLoss(EuclideanDistance(), margin=1.5, pos_margin=1.45)(emb, labels)
    assert inside.loss.item() == pytest.approx(near, rel=1e-6)
    assert inside.active_fraction.item() == pytest.approx(2 / 6)


def test_contrastive_duplicate_pair_is_not_counted_reproducer():
    torch.manual_seed(0)
    e = F.normalize(torch.randn(4, 8), dim=1)
    e[1] = e[0]
    y = torch.tensor([0, 0, 1, 1])
    out = ContrastiveLoss(EuclideanDistance(), margin=1.0, pos_margin=0.0, reduction="nonzero")(
        e, y
    )
    assert out.loss.item() == pytest.approx(((e[2] - e[3]).norm() ** 2).item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(2.762, abs=1e-3)
    assert out.active_fraction.item() == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ContrastiveLoss(EuclideanDistance(), margin=1.2, pos_margin=0.1),
        lambda: ContrastiveLoss(CosineSimilarity(), margin=1.2, pos_margin=0.1),
        lambda: TripletLoss(EuclideanDistance(), margin=0.3, mining="batch_hard"),
        lambda: TripletLoss(EuclideanDistance(), margin=0.3, mining="semi_hard"),
        lambda: TripletLoss(CosineSimilarity(), margin=0.3, mining="all"),
        lambda: MultiSimilarityLoss(EuclideanDistance()),
        lambda: MultiSimilarityLoss(CosineSimilarity()),
    ],
    ids=[
        "contrastive-euc",
        "contrastive-cos",
        "batch_hard",
        "semi_hard",
        "all-cos",
        "ms-euc",
        "ms-cos",
    ],
)
def test_raw_embeddings_give_the_loss_of_their_unit_copies(make):
    # A normalising distance normalises what a loss is handed directly (norms 0.2 to 5 here).
    torch.manual_seed(2)
    unit = F.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1)
    raw = unit * torch.linspace(0.2, 5.0, 12, dtype=torch.float64)[:, None]
    labels = torch.randint(0, 3, (12,))
    loss = make()
    expected, got = loss(unit, labels), loss(raw, labels)
    assert expected.loss.item() > 0
    assert got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-9)
    assert got.active_fraction.item() == pytest.approx(expected.active_fraction.item())
    assert got.pos_distance.item() == pytest.approx(expected.pos_distance.item(), rel=1e-9)
    if isinstance(loss, ContrastiveLoss):
        same = labels[:6] == labels[6:]
        pairs = loss.forward_pairs(raw[:6], raw[6:], same).loss
        assert pairs.item() == pytest.approx(
            loss.forward_pairs(unit[:6], unit[6:], same).loss.item(), rel=1e-9
        )


def test_raw_embeddings_stay_raw_for_a_distance_that_does_not_normalise():
    # (3, 4) and the origin, same class: d = 5, the loss (5 - 0)^2 = 25.
    emb = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    loss = ContrastiveLoss(EuclideanDistance(normalize_embeddings=False), margin=1.0)
    assert loss(emb, torch.tensor([0, 0])).loss.item() == pytest.approx(25.0)


def triplet_by_loop(emb, labels, margin, mining):
    d = lambda i, j: float((emb[i] - emb[j]).norm())  # noqa: E731
    n = len(emb)
    losses = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
        negatives = [q for q in range(n) if labels[q] != labels[a]]
        if not positives or not negatives:
            continue
        if mining == "batch_hard":
            losses.append(
                max(max(d(a, p) for p in positives) - min(d(a, q) for q in negatives) + margin, 0.0)
            )
            continue
        for p in positives:
            if mining == "all":
                losses += [max(d(a, p) - d(a, q) + margin, 0.0) for q in negatives]
                continue
            farther = [d(a, q) for q in negatives if d(a, q) > d(a, p)]
            chosen = min(farther) if farther else max(d(a, q) for q in negatives)
            losses.append(max(d(a, p) - chosen + margin, 0.0))
    if mining == "all":
        nonzero = [x for x in losses if x > 0]
        return sum(nonzero) / max(1, len(nonzero))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "all"])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_triplet_mining_matches_explicit_loop(mining, margin):
    emb = EMB.clone().requires_grad_(True)
    out = TripletLoss(EuclideanDistance(), margin=margin, mining=mining)(emb, LABELS)
    assert out.loss.item() == pytest.approx(triplet_by_loop(EMB, LABELS, margin, mining), rel=1e-6)
    out.loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_triplet_on_random_batch_matches_loop():
    torch.manual_seed(3)
    emb = F.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (12,))
    for mining in TripletLoss.MINING:
        out = TripletLoss(EuclideanDistance(), margin=0.3, mining=mining)(emb, labels)
        assert out.loss.item() == pytest.approx(triplet_by_loop(emb, labels, 0.3, mining), rel=1e-6)


def test_all_triplets_in_anchor_chunks_give_the_same_loss_and_gradient(monkeypatch):
    """The (B, B, B) triplets are visited a few anchors at a time (bounded memory)."""
    import siamese.losses as losses

    torch.manual_seed(4)
    emb = F.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (12,))
    results = []
    for chunk in (losses.TRIPLET_CHUNK, 5 * 12 * 12):  # one chunk, then 3 chunks of 5 anchors
        monkeypatch.setattr(losses, "TRIPLET_CHUNK", chunk)
        x = emb.clone().requires_grad_(True)
        out = TripletLoss(EuclideanDistance(), margin=0.3, mining="all")(x, labels)
        out.loss.backward()
        results.append((out.loss.detach(), out.active_fraction, x.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    assert results[0][0].item() == pytest.approx(triplet_by_loop(emb, labels, 0.3, "all"), rel=1e-9)


def test_triplet_without_negatives_is_zero_not_nan():
    emb = EMB.clone().requires_grad_(True)
    out = TripletLoss(EuclideanDistance())(emb, torch.zeros(6, dtype=torch.long))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: ContrastiveLoss(EuclideanDistance(), margin=1.0),
        lambda: TripletLoss(EuclideanDistance(), mining="batch_hard"),
        lambda: TripletLoss(EuclideanDistance(), mining="all"),
        lambda: MultiSimilarityLoss(CosineSimilarity()),
    ],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_embedding_makes_the_loss_nan_not_zero(make, bad):
    # Mining masks drop every pair a NaN touches: without this the loss would read 0 (or a
    # finite value of the other pairs) while the weights are already broken.
    loss = make()
    emb = EMB.clone()
    assert torch.isfinite(loss(emb, LABELS).loss)
    emb[2, 0] = bad
    assert torch.isnan(loss(emb, LABELS).loss)
    if isinstance(loss, ContrastiveLoss):
        same = torch.tensor([True, False, True])
        assert torch.isnan(loss.forward_pairs(emb[:3], EMB[3:], same).loss)


def test_bce_with_learned_distance_matches_formula():
    torch.manual_seed(0)
    dist = LearnedDistance(embedding_dim=2)
    out = BCELoss(dist)(EMB.float(), LABELS)
    logits, same = [], []
    for i, j in itertools.combinations(range(6), 2):
        logits.append(dist.paired(EMB[i : i + 1].float(), EMB[j : j + 1].float()).item())
        same.append(bool(LABELS[i] == LABELS[j]))
    terms = F.binary_cross_entropy_with_logits(
        torch.tensor(logits), torch.tensor(same, dtype=torch.float), reduction="none"
    )
    s = torch.tensor(same)
    assert out.loss.item() == pytest.approx(
        0.5 * (terms[s].mean() + terms[~s].mean()).item(), rel=1e-5
    )


@pytest.mark.parametrize("distance", [EuclideanDistance(), CosineSimilarity()])
def test_bce_refuses_a_distance_without_logits(distance):
    with pytest.raises(ConfigError, match=f"loss=bce needs .*distance=learned.*{distance.name}"):
        BCELoss(distance)


def test_bad_loss_parameters():
    with pytest.raises(ConfigError, match="loss.mining='hardest'"):
        TripletLoss(EuclideanDistance(), mining="hardest")
    with pytest.raises(ConfigError, match="must exceed loss.pos_margin"):
        ContrastiveLoss(EuclideanDistance(), margin=0.1, pos_margin=0.5)
    with pytest.raises(ConfigError, match="loss.reduction='sum'"):
        ContrastiveLoss(EuclideanDistance(), reduction="sum")


def multi_similarity_by_loop(emb, labels, alpha=2.0, beta=50.0, base=0.5, eps=0.1):
    s = lambda i, j: float(emb[i] @ emb[j]) / float(emb[i].norm() * emb[j].norm())  # noqa: E731
    n, losses = len(emb), []
    for a in range(n):
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [q for q in range(n) if labels[q] != labels[a]]
        if not pos or not neg:
            continue
        hardest_pos, hardest_neg = min(s(a, p) for p in pos), max(s(a, q) for q in neg)
        kept_pos = [s(a, p) for p in pos if s(a, p) - eps < hardest_neg]
        kept_neg = [s(a, q) for q in neg if s(a, q) + eps > hardest_pos]
        pos_term = math.log(1 + sum(math.exp(-alpha * (v - base)) for v in kept_pos)) / alpha
        neg_term = math.log(1 + sum(math.exp(beta * (v - base)) for v in kept_neg)) / beta
        losses.append(pos_term + neg_term)
    return sum(losses) / len(losses)


def test_multi_similarity_on_hand_placed_points():
    # Class 0 at 0 and 60 degrees, class 1 at 90 and 180. Cosines: (0,60) 0.5, (0,90) 0,
    # (0,180) -1, (60,90) cos 30, (60,180) -0.5, (90,180) 0. With epsilon 0.1, anchors 0 and
    # 180 keep no pair (their hardest positive already beats every negative by > 0.1):
    # anchor 60: positive 0.5, negative cos 30; anchor 90: positive 0, negatives 0 and cos 30.
    emb = circle([0, 60, 90, 180]).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1])
    c30 = math.cos(math.pi / 6)
    anchor_60 = math.log(2) / 2 + math.log(1 + math.exp(50 * (c30 - 0.5))) / 50
    anchor_90 = (
        math.log(1 + math.exp(1)) / 2
        + math.log(1 + math.exp(-25) + math.exp(50 * (c30 - 0.5))) / 50
    )
    for distance in (EuclideanDistance(), CosineSimilarity()):
        out = MultiSimilarityLoss(distance)(emb, labels)
        assert out.loss.item() == pytest.approx((anchor_60 + anchor_90) / 4, rel=1e-9)
        assert out.active_fraction.item() == pytest.approx(5 / 12)  # ordered pairs kept
    out.loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_multi_similarity_on_random_batch_matches_loop():
    torch.manual_seed(5)
    emb = torch.randn(14, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (14,))
    for eps in (0.0, 0.1, 2.0):
        out = MultiSimilarityLoss(CosineSimilarity(), epsilon=eps)(emb, labels)
        expected = multi_similarity_by_loop(F.normalize(emb, dim=1), labels, eps=eps)
        assert out.loss.item() == pytest.approx(expected, rel=1e-9)


def test_multi_similarity_needs_unit_embeddings_and_valid_parameters():
    with pytest.raises(ConfigError, match="loss=multi_similarity needs unit-length.*learned"):
        MultiSimilarityLoss(LearnedDistance(embedding_dim=4))
    with pytest.raises(ConfigError, match="distance=euclidean does not normalise"):
        MultiSimilarityLoss(EuclideanDistance(normalize_embeddings=False))
    with pytest.raises(ConfigError, match="loss.alpha and loss.beta must be > 0"):
        MultiSimilarityLoss(CosineSimilarity(), beta=0)
