"""Distances Φ: merge two embeddings into a score; each knows whether larger means closer.

Losses take a distance object (the pytorch-metric-learning way), so one loss serves every Φ.
``to_distance`` turns any score into "lower means more alike" for verification metrics, and
``faiss_metric`` says how retrieval should search the embeddings ``prepare`` returns.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese.checks import check_int_setting
from siamese.errors import ConfigError

_EPS = 1e-12


class Distance(nn.Module):
    """Base class. ``pairwise`` gives (Na, Nb) scores, ``paired`` gives (N,) for row pairs."""

    name: ClassVar[str] = "distance"
    is_similarity: ClassVar[bool] = False
    faiss_metric: ClassVar[str] = "l2"  # how to search prepare()d embeddings: "l2" or "ip"

    def __init__(self, normalize_embeddings: bool = False) -> None:
        super().__init__()
        self.normalize_embeddings = normalize_embeddings

    def prepare(self, emb: Tensor) -> Tensor:
        """Embeddings as the distance sees them (L2-normalised where configured)."""
        return F.normalize(emb, dim=-1) if self.normalize_embeddings else emb

    def pairwise(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def paired(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def to_distance(self, scores: Tensor) -> Tensor:
        """Scores as dissimilarities: lower means more alike."""
        return -scores if self.is_similarity else scores


class EuclideanDistance(Distance):
    """‖a - b‖₂, on L2-normalised embeddings by default (then it lies in [0, 2])."""

    name = "euclidean"

    def __init__(self, normalize_embeddings: bool = True) -> None:
        super().__init__(normalize_embeddings)

    def pairwise(self, a: Tensor, b: Tensor) -> Tensor:
        sq = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1) - 2.0 * a @ b.T
        return _sqrt(sq)  # (Na, Nb)

    def paired(self, a: Tensor, b: Tensor) -> Tensor:
        return _sqrt((a - b).pow(2).sum(-1))  # (N,)


def _sqrt(sq: Tensor) -> Tensor:
    """sqrt(max(sq, 0)) with sqrt(max(sq, 1e-12))'s gradient: finite for identical rows (0
    there), where sqrt's is infinite. The value is not floored, so identical rows are at
    distance 0 exactly and a margin test on it (a contrastive loss's) sees 0, not 1e-6."""
    floored = sq.clamp_min(_EPS).sqrt()
    return torch.where(sq > _EPS, floored, sq.clamp_min(0).sqrt().detach())


class CosineSimilarity(Distance):
    """cos(a, b) in [-1, 1], larger means closer; searched as inner product of unit vectors."""

    name = "cosine"
    is_similarity = True
    faiss_metric = "ip"

    def __init__(self) -> None:
        super().__init__(normalize_embeddings=True)

    def prepare(self, emb: Tensor) -> Tensor:
        return F.normalize(emb, dim=-1)

    def pairwise(self, a: Tensor, b: Tensor) -> Tensor:
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    def paired(self, a: Tensor, b: Tensor) -> Tensor:
        return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)

    def to_distance(self, scores: Tensor) -> Tensor:
        return 1.0 - scores  # cosine distance in [0, 2]


class LearnedDistance(Distance):
    """Koch et al. 2015: |e1 - e2| -> Linear -> logit of "same" (larger means closer).

    No index can search a learned head, so faiss searches the raw embeddings by L2;
    ``evaluate.py eval.rank_by=head`` ranks with the head instead, by brute force.
    """

    name = "learned"
    is_similarity = True

    def __init__(self, embedding_dim: int, normalize_embeddings: bool = False) -> None:
        super().__init__(normalize_embeddings)
        check_int_setting("distance.embedding_dim", embedding_dim)
        self.head = nn.Linear(embedding_dim, 1)

    def pairwise(self, a: Tensor, b: Tensor) -> Tensor:
        # Rows in blocks, so the (rows, Nb, D) difference stays near 16M elements.
        rows = max(1, (1 << 24) // max(1, b.shape[0] * b.shape[1]))
        out = [
            self.head((a[i : i + rows].unsqueeze(1) - b.unsqueeze(0)).abs()).squeeze(-1)
            for i in range(0, a.shape[0], rows)
        ]
        return torch.cat(out)  # (Na, Nb)

    def paired(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head((a - b).abs()).squeeze(-1)


def check_embedding_dim(distance: Distance, embedding_dim: int) -> None:
    """Refuse an embedding too small for ``distance``: an L2-normalised 1-D embedding is
    +1 or -1, so every image lands on one of two points and no training can separate more
    than two groups (a collapse that no loss curve explains)."""
    # 0 and below: the tower's own check says what a dimension must be.
    if distance.normalize_embeddings and isinstance(embedding_dim, int) and embedding_dim == 1:
        raise ConfigError(
            f"model.embedding_dim=1 with distance={distance.name}, which "
            "L2-normalises the embeddings, leaves two possible embeddings (+1 and -1), so "
            "every image collapses onto one of them; use model.embedding_dim >= 2"
        )


def config_name(distance: Distance) -> str:
    """euclidean, cosine or learned: a distance as conf/distance/ names it (else its class)."""
    for cls, name in (
        (LearnedDistance, "learned"),
        (CosineSimilarity, "cosine"),
        (EuclideanDistance, "euclidean"),
    ):
        if isinstance(distance, cls):
            return name
    return type(distance).__name__
