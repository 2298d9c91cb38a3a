"""Names of the metrics a training run logs, free of torch so sweeps can check them early."""

from __future__ import annotations

# N-way 1-shot accuracy is reported on the test split where it has N classes (Koch et al.).
ONESHOT_WAYS = (5, 20)

# Logged under val/ and test/ (recall@k, one-shot and TAR@FAR where the split allows them).
EVAL_METRICS = (
    "loss",
    "precision_at_1",
    "recall_at_1",
    "recall_at_5",
    "recall_at_10",
    "r_precision",
    "map_at_r",
    "roc_auc",
    "eer",
    "tar_at_far_1e-3",
    "tar_at_far_1e-2",
    "verification_accuracy",
    "threshold",
    "pos_distance",
    "neg_distance",
)
TEST_ONLY_METRICS = tuple(f"oneshot_{n}way_1shot" for n in ONESHOT_WAYS)
TRAIN_METRICS = ("loss", "active_fraction", "pos_distance", "neg_distance", "images_per_sec")


def available_metrics() -> list[str]:
    """Every metric name a training run can log, as ``stage/name``."""
    names = [f"val/{n}" for n in EVAL_METRICS]
    names += [f"test/{n}" for n in (*EVAL_METRICS, *TEST_ONLY_METRICS)]
    names += [f"train/{n}" for n in TRAIN_METRICS]
    return names
