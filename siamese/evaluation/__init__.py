"""Evaluation on plain arrays: retrieval, verification, one-shot and open-set identification
metrics, no model or Lightning; ``Evaluator`` scores a split into one report that every caller
shares. Plots live in ``siamese.evaluation.plots``, ``grids`` and ``search_plots`` (matplotlib)."""

from siamese.evaluation.evaluator import EvalReport, Evaluator, Neighbours
from siamese.evaluation.identification import open_set_metrics
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
    "EvalReport",
    "Evaluator",
    "Neighbours",
    "build_index",
    "class_groups",
    "normalize",
    "oneshot_accuracy",
    "oneshot_metrics",
    "open_set_metrics",
    "retrieval_metrics",
    "sample_episodes",
    "scored_retrieval_metrics",
    "threshold_at_far",
    "verification_metrics",
]
