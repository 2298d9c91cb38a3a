"""Distances on hand-placed points: euclidean, cosine and the learned head, pairwise and paired."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import circle

from siamese.distances import CosineSimilarity, EuclideanDistance, LearnedDistance


def test_distances_on_hand_placed_points():
    a, b = circle([0, 90]), circle([90, 180])
    euc, cos = EuclideanDistance(), CosineSimilarity()
    assert torch.allclose(euc.paired(a, b), torch.tensor([math.sqrt(2)] * 2, dtype=torch.float64))
    assert torch.allclose(
        euc.pairwise(a, a), torch.tensor([[0, 2**0.5], [2**0.5, 0]]).double(), atol=1e-6
    )
    assert torch.allclose(
        cos.pairwise(a, b), torch.tensor([[0.0, -1.0], [1.0, 0.0]]).double(), atol=1e-7
    )
    assert torch.allclose(cos.to_distance(torch.tensor([1.0, -1.0])), torch.tensor([0.0, 2.0]))
    assert not euc.is_similarity and cos.is_similarity
    # Unnormalised euclidean: |(3, 4)| = 5.
    assert EuclideanDistance(False).paired(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)) == 5
    assert torch.allclose(
        EuclideanDistance().prepare(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]])
    )


def test_learned_distance_is_a_linear_head_on_the_absolute_difference():
    head = LearnedDistance(embedding_dim=2)
    with torch.no_grad():
        head.head.weight.copy_(torch.tensor([[2.0, -1.0]]))
        head.head.bias.fill_(0.5)
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[4.0, 1.0]])
    assert head.paired(a, b).item() == pytest.approx(2 * 3 - 1 * 2 + 0.5)
    assert head.pairwise(a, b).item() == pytest.approx(4.5)
    assert head.to_distance(torch.tensor([4.5])).item() == -4.5


def test_identical_rows_are_at_distance_zero_with_a_finite_gradient():
    # No 1e-6 floor on the value (a margin test would count it), a finite gradient all the same.
    a = torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    euc = EuclideanDistance(normalize_embeddings=False)
    d = euc.pairwise(a, a)
    assert d[0, 1].item() == 0.0 and d[0, 0].item() == 0.0
    assert euc.paired(a[:1], a[1:2]).item() == 0.0
    assert d[0, 2].item() == pytest.approx(math.sqrt(0.4**2 + 0.8**2), rel=1e-6)
    (d.sum() + euc.paired(a[:1], a[1:2]).sum()).backward()
    assert torch.isfinite(a.grad).all()


def test_learned_pairwise_in_blocks_equals_paired_on_every_pair():
    torch.manual_seed(1)
    dist = LearnedDistance(embedding_dim=4096)
    a, b = torch.randn(10, 4096), torch.randn(7, 4096)  # 4096 * 7 per row: one block
    full = dist.pairwise(a, b)
    rows = torch.arange(10).repeat_interleave(7)
    cols = torch.arange(7).repeat(10)
    assert torch.allclose(full.flatten(), dist.paired(a[rows], b[cols]), atol=1e-5)
    big = torch.randn(600, 4096)  # 6 rows a block: 20 rows take 4 blocks
    blocked = dist.pairwise(big[:20], big)
    assert blocked.shape == (20, 600)
    assert torch.allclose(blocked[13], dist.paired(big[13].expand(600, -1), big), atol=1e-5)
