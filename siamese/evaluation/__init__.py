"""Evaluation on plain arrays: retrieval and verification metrics, no model or Lightning."""

from siamese.evaluation.retrieval import normalize, retrieval_metrics
from siamese.evaluation.verification import threshold_at_far, verification_metrics

__all__ = ["normalize", "retrieval_metrics", "threshold_at_far", "verification_metrics"]
