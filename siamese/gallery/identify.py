"""Open-set decisions: an ``Identity`` per query, by vote among neighbours or class means."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from siamese.module import SiameseModule


@dataclass(frozen=True)
class Identity:
    """An open-set decision: ``label`` None (unknown) when ``distance`` is beyond the threshold;
    ``nearest`` is the best candidate's label either way."""

    label: str | None
    distance: float
    known: bool
    nearest: str

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "distance": self.distance, "known": self.known}


def vote(labels: Sequence[str], distances: Sequence[float]) -> tuple[str, float]:
    """The most frequent of ``labels`` (nearest first), ties to the label met first, and the
    distance of its nearest member."""
    counts: dict[str, int] = {}
    first: dict[str, float] = {}
    for name, d in zip(labels, distances, strict=True):
        counts[name] = counts.get(name, 0) + 1
        first.setdefault(name, float(d))
    name = max(counts, key=lambda n: (counts[n], -first[n]))
    return name, first[name]


def class_centroids(
    model: SiameseModule, embeddings: np.ndarray, labels: Sequence[str]
) -> tuple[list[str], Tensor]:
    """The labelled classes (sorted) and their mean embeddings, prepared as ``model``'s
    distance prepares embeddings (re-normalised where it normalises), on its device."""
    array = np.asarray(labels, dtype=object)
    names = sorted({str(x) for x in labels} - {""})
    means = np.stack([embeddings[array == n].mean(axis=0) for n in names])
    with torch.no_grad():
        prepared = model.distance.prepare(torch.as_tensor(means, dtype=torch.float32))
    return names, prepared.to(model.device)
