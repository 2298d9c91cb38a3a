"""Objectives: contrastive, triplet (with in-batch mining), multi-similarity and binary
cross-entropy.

Each loss takes a Distance. ``forward(emb, labels)`` uses every pair (or triplet) inside a
batch; pair losses also offer ``forward_pairs(e1, e2, same)`` for explicit (x1, x2, same)
batches. Both return a LossOutput with the scalar and what a dashboard needs to spot a
collapse (the fraction of active terms and the mean same/different distance).

Every loss first passes its embeddings through ``distance.prepare`` (pytorch-metric-learning's
``normalize_embeddings=True``), so raw embeddings given to a normalising distance (cosine,
euclidean on unit vectors) score as their unit-length copies would; the model's embeddings,
already prepared, are unchanged by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese.distances import Distance, LearnedDistance
from siamese.errors import ConfigError


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable
    active_fraction: Tensor  # fraction of pairs/triplets inside their margin (a non-zero loss)
    pos_distance: Tensor  # mean distance of same pairs (lower means more alike)
    neg_distance: Tensor  # mean distance of different pairs


def in_batch_pairs(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All B(B-1)/2 pairs i < j of a batch: (rows, cols, same)."""
    rows, cols = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    return rows, cols, labels[rows] == labels[cols]


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is set (0 for an empty mask), without boolean
    indexing: no data-dependent shape, so no device sync; masked-out infinities are fine."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp_min(1)


def _propagate_nonfinite(loss: Tensor, *embeddings: Tensor) -> Tensor:
    """NaN where an embedding is not finite: mining masks would otherwise drop every pair
    and report a loss of 0 for broken weights (checked on the device: no sync)."""
    finite = torch.stack([torch.isfinite(e).all() for e in embeddings]).all()
    return torch.where(finite, loss, torch.full_like(loss, math.nan))


# "all" triplet mining visits (B, B, B) triplets in chunks of anchors holding at most this
# many entries, so a 1,000-image validation batch does not need gigabytes.
TRIPLET_CHUNK = 2**24


class PairLoss(nn.Module):
    """A loss on pair scores; subclasses define ``terms(scores, same) -> (active, loss)``."""

    def __init__(self, distance: Distance) -> None:
        super().__init__()
        self.distance = distance

    def terms(self, scores: Tensor, same: Tensor) -> tuple[Tensor, Tensor]:
        """(P,) bool: which pairs have a non-zero loss; and the loss, reduced the way this
        objective wants it."""
        raise NotImplementedError

    def forward(self, emb: Tensor, labels: Tensor) -> LossOutput:
        emb = self.distance.prepare(emb)
        rows, cols, same = in_batch_pairs(labels)
        scores = self.distance.pairwise(emb, emb)[rows, cols]  # (P,)
        return self._output(scores, same, emb)

    def forward_pairs(self, e1: Tensor, e2: Tensor, same: Tensor) -> LossOutput:
        e1, e2 = self.distance.prepare(e1), self.distance.prepare(e2)
        return self._output(self.distance.paired(e1, e2), same.bool(), e1, e2)

    def _output(self, scores: Tensor, same: Tensor, *embeddings: Tensor) -> LossOutput:
        active, loss = self.terms(scores, same)
        dist = self.distance.to_distance(scores.detach())
        return LossOutput(
            loss=_propagate_nonfinite(loss, *embeddings),
            active_fraction=active.detach().float().mean(),
            pos_distance=_masked_mean(dist, same),
            neg_distance=_masked_mean(dist, ~same),
        )


class ContrastiveLoss(PairLoss):
    """Hadsell et al. 2006: pull same pairs within ``pos_margin``, push others past ``margin``.

    Works on ``distance.to_distance`` (cosine becomes 1 - cos). Same and different terms are
    averaged separately and added, so the many negatives of an in-batch batch do not drown
    the few positives. ``reduction="nonzero"`` averages each over its active pairs only
    (pytorch-metric-learning's default reducer): a same pair farther than ``pos_margin``, a
    different pair closer than ``margin``, tested on the distance itself (not on a loss
    that rounding can leave at 1e-12); ``"mean"`` averages over all pairs. Margins apply to
    ``to_distance``, so for a similarity they are its mirror: cosine's 1 - cos.
    """

    REDUCTIONS = ("nonzero", "mean")

    def __init__(
        self,
        distance: Distance,
        margin: float = 1.0,
        pos_margin: float = 0.0,
        reduction: str = "nonzero",
    ) -> None:
        super().__init__(distance)
        if reduction not in self.REDUCTIONS:
            raise ConfigError(
                f"loss.reduction={reduction!r} is unknown; expected one of {self.REDUCTIONS}"
            )
        self.reduction = reduction
        if margin <= pos_margin:
            raise ConfigError(
                f"loss.margin ({margin}) must exceed loss.pos_margin ({pos_margin}); "
                "different pairs are pushed beyond margin, same pairs pulled within pos_margin"
            )
        self.margin = margin
        self.pos_margin = pos_margin

    def terms(self, scores: Tensor, same: Tensor) -> tuple[Tensor, Tensor]:
        d = self.distance.to_distance(scores)
        per_pair = torch.where(
            same, F.relu(d - self.pos_margin).pow(2), F.relu(self.margin - d).pow(2)
        )
        active = torch.where(same, d > self.pos_margin, d < self.margin)
        counted = active if self.reduction == "nonzero" else torch.ones_like(same)
        loss = _masked_mean(per_pair, same & counted) + _masked_mean(per_pair, ~same & counted)
        return active, loss


class BCELoss(PairLoss):
    """Koch et al. 2015: binary cross-entropy on the learned head's logit of "same".

    Same and different pairs are weighted equally (an in-batch batch has far more negatives).
    """

    def __init__(self, distance: Distance) -> None:
        super().__init__(distance)
        if not isinstance(distance, LearnedDistance):
            raise ConfigError(
                f"loss=bce needs the logits of distance=learned, but distance={distance.name}; "
                f"use distance=learned with loss=bce, or loss=contrastive or loss=triplet "
                f"with distance={distance.name}"
            )

    def terms(self, scores: Tensor, same: Tensor) -> tuple[Tensor, Tensor]:
        per_pair = F.binary_cross_entropy_with_logits(scores, same.float(), reduction="none")
        loss = 0.5 * (_masked_mean(per_pair, same) + _masked_mean(per_pair, ~same))
        return per_pair > 0, loss


class TripletLoss(nn.Module):
    """Schroff et al. 2015: d(a, p) + margin < d(a, n), with triplets mined inside the batch.

    ``mining``: ``batch_hard`` (Hermans et al. 2017: hardest positive and negative per
    anchor), ``semi_hard`` (FaceNet: per positive pair, the closest negative farther than the
    positive; the farthest negative when none is), or ``all`` (every valid triplet, averaged
    over the non-zero ones).
    """

    MINING = ("batch_hard", "semi_hard", "all")

    def __init__(self, distance: Distance, margin: float = 0.2, mining: str = "batch_hard") -> None:
        super().__init__()
        if mining not in self.MINING:
            raise ConfigError(f"loss.mining={mining!r} is unknown; expected one of {self.MINING}")
        if margin < 0:
            raise ConfigError(f"loss.margin must be >= 0, got {margin}")
        self.distance = distance
        self.margin = margin
        self.mining = mining

    def forward(self, emb: Tensor, labels: Tensor) -> LossOutput:
        emb = self.distance.prepare(emb)
        d = self.distance.to_distance(self.distance.pairwise(emb, emb))  # (B, B)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = same & ~eye
        neg = ~same
        # Masked means throughout (no boolean indexing, no Python test of a tensor): the
        # step never waits for the device.
        if self.mining == "batch_hard":
            d_ap = d.masked_fill(~pos, float("-inf")).amax(1)  # (B,)
            d_an = d.masked_fill(~neg, float("inf")).amin(1)
            valid = pos.any(1) & neg.any(1)
            per = F.relu(d_ap - d_an + self.margin)
            loss = _masked_mean(per, valid)
            active = _masked_mean((per.detach() > 0).float(), valid)
        elif self.mining == "semi_hard":
            # For anchor a and positive p: the closest negative farther than d(a, p), found
            # by a binary search in a's sorted negative distances; else the farthest one.
            neg_sorted, _ = d.masked_fill(~neg, float("inf")).sort(dim=1)  # (B, B)
            after = torch.searchsorted(neg_sorted.detach(), d.detach(), right=True)  # (B, B)
            has_farther = after < neg.sum(1, keepdim=True)
            closest_farther = neg_sorted.gather(1, after.clamp(max=len(labels) - 1))
            farthest = d.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)  # (B, 1)
            chosen = torch.where(has_farther, closest_farther, farthest.expand_as(d))
            valid = pos & neg.any(1, keepdim=True)
            per = F.relu(d - chosen + self.margin)
            loss = _masked_mean(per, valid)
            active = _masked_mean((per.detach() > 0).float(), valid)
        else:  # all: the mean over the triplets with a non-zero loss
            total, nonzero, triplets = d.new_zeros(()), d.new_zeros(()), d.new_zeros(())
            step = max(1, TRIPLET_CHUNK // max(1, len(labels) ** 2))
            for start in range(0, len(labels), step):
                a = slice(start, start + step)
                triplet = pos[a].unsqueeze(2) & neg[a].unsqueeze(1)  # (c, B, B)
                per = F.relu(d[a].unsqueeze(2) - d[a].unsqueeze(1) + self.margin)
                counted = triplet & (per > 0)
                total = total + torch.where(counted, per, 0).sum()
                nonzero = nonzero + counted.sum()
                triplets = triplets + triplet.sum()
            loss = total / nonzero.clamp_min(1)
            active = nonzero / triplets.clamp_min(1)
        dd = d.detach()
        return LossOutput(
            loss=_propagate_nonfinite(loss, emb),
            active_fraction=active,
            pos_distance=_masked_mean(dd, pos),
            neg_distance=_masked_mean(dd, neg),
        )


class MultiSimilarityLoss(nn.Module):
    """Wang et al. 2019: weigh every in-batch pair by its own and its neighbours' similarity.

    Works on cosine similarity S (unit-length embeddings: ``distance=cosine``, or
    ``euclidean`` with ``normalize_embeddings``, where S = 1 - d^2/2). For each anchor i,
    pairs are first mined (a negative is kept when S_in + epsilon > the hardest positive's
    S, a positive when S_ip - epsilon < the hardest negative's S), then

        L_i = 1/alpha log(1 + sum_p exp(-alpha (S_ip - base)))
            + 1/beta  log(1 + sum_n exp( beta (S_in - base)))

    averaged over the anchors that have both a positive and a negative in the batch (every
    anchor of a class-balanced batch; pytorch-metric-learning averages over all anchors,
    counting the others as 0, which scales an evaluation batch's loss down). Defaults are
    pytorch-metric-learning's: alpha 2, beta 50, base 0.5, epsilon 0.1.
    """

    def __init__(
        self,
        distance: Distance,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(distance, LearnedDistance):
            raise ConfigError(
                "loss=multi_similarity needs unit-length embeddings, and distance=learned "
                "scores pairs with a head; use distance=cosine or distance=euclidean, or "
                "loss=bce with distance=learned"
            )
        if not distance.normalize_embeddings:
            raise ConfigError(
                f"loss=multi_similarity needs unit-length embeddings, but distance="
                f"{distance.name} does not normalise them; set "
                "distance.normalize_embeddings=true or use distance=cosine"
            )
        if alpha <= 0 or beta <= 0 or epsilon < 0:
            raise ConfigError(
                f"loss.alpha and loss.beta must be > 0 and loss.epsilon >= 0, got "
                f"{alpha}, {beta} and {epsilon}"
            )
        self.distance = distance
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon

    def similarity(self, emb: Tensor) -> Tensor:
        scores = self.distance.pairwise(emb, emb)
        if self.distance.is_similarity:
            return scores
        return 1 - scores.pow(2) / 2  # unit vectors: |a - b|^2 = 2 - 2 cos

    def forward(self, emb: Tensor, labels: Tensor) -> LossOutput:
        emb = self.distance.prepare(emb)  # unit length, which 1 - d^2 / 2 = cos needs
        s = self.similarity(emb)  # (B, B)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos, neg = same & ~eye, ~same
        sd = s.detach()
        hardest_pos = sd.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
        hardest_neg = sd.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
        pos_kept = pos & (sd - self.epsilon < hardest_neg)
        neg_kept = neg & (sd + self.epsilon > hardest_pos)
        pos_term = _log1p_sum_exp(-self.alpha * (s - self.base), pos_kept) / self.alpha
        neg_term = _log1p_sum_exp(self.beta * (s - self.base), neg_kept) / self.beta
        valid = pos.any(1) & neg.any(1)
        loss = _masked_mean(pos_term + neg_term, valid)  # no boolean indexing: no device sync
        dd = self.distance.to_distance(self.distance.pairwise(emb, emb).detach())
        return LossOutput(
            loss=_propagate_nonfinite(loss, emb),
            active_fraction=(pos_kept | neg_kept).float().sum() / (pos | neg).float().sum(),
            pos_distance=_masked_mean(dd, pos),
            neg_distance=_masked_mean(dd, neg),
        )


def _log1p_sum_exp(x: Tensor, mask: Tensor) -> Tensor:
    """Row-wise log(1 + sum over masked entries of exp(x)), stable (0 for an empty row)."""
    x = x.masked_fill(~mask, float("-inf"))
    zeros = x.new_zeros(x.shape[0], 1)
    return torch.logsumexp(torch.cat([zeros, x], dim=1), dim=1)
