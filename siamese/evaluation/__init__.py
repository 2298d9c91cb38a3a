"""Evaluation on plain arrays: retrieval, verification and one-shot metrics, no model or
Lightning. Plots live in ``siamese.evaluation.plots`` (imported on demand: matplotlib)."""

from siamese.evaluation.index import build_index
from siamese.evaluation.oneshot import (
    Episodes,
    class_groups,
    oneshot_accuracy,
    oneshot_metrics,
    sample_episodes,
)
from siamese.evaluation.retrieval import normalize, retrieval_metrics, scored_retrieval_metrics
from siamese.evaluation.verification import threshold_at_far, verification_metrics

__all__ = [
    "Episodes",
    "build_index",
    "class_groups",
    "normalize",
    "oneshot_accuracy",
    "oneshot_metrics",
    "retrieval_metrics",
    "sample_episodes",
    "scored_retrieval_metrics",
    "threshold_at_far",
    "verification_metrics",
]
