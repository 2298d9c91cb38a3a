"""Which callbacks a run keeps: those the trainer's progress-bar and summary flags allow."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pytorch_lightning.callbacks import Callback, ModelSummary, ProgressBar


def select_callbacks(
    callbacks: Iterable[Callback], trainer_cfg: Mapping[str, Any]
) -> list[Callback]:
    """The callbacks the trainer flags allow.

    Lightning refuses a progress-bar callback when ``enable_progress_bar`` is false and
    would still print a configured model summary when ``enable_model_summary`` is false, so
    both are dropped where their flag is off.
    """
    bar = bool(trainer_cfg.get("enable_progress_bar", True))
    summary = bool(trainer_cfg.get("enable_model_summary", True))
    return [
        c
        for c in callbacks
        if not (isinstance(c, ProgressBar) and not bar)
        and not (isinstance(c, ModelSummary) and not summary)
    ]
