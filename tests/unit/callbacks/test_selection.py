"""Callback selection: the callbacks kept follow the trainer's flags."""

from __future__ import annotations

from pytorch_lightning.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichModelSummary,
    RichProgressBar,
)

from siamese.callbacks import (
    DashboardPlots,
    Throughput,
    select_callbacks,
)
from siamese.pipelines.train import instantiate_all


def test_select_callbacks_follows_the_trainer_flags(make_cfg):
    callbacks = instantiate_all(make_cfg(fast=False).callbacks)
    kinds = {type(c) for c in callbacks}
    assert {RichProgressBar, RichModelSummary, Throughput, DashboardPlots} <= kinds
    assert select_callbacks(callbacks, {}) == callbacks  # Lightning's defaults: both on
    # FAST turns the progress bar and the summary off.
    kept = select_callbacks(callbacks, make_cfg(plots=True).trainer)
    assert not any(isinstance(c, (ProgressBar, RichModelSummary)) for c in kept)
    assert {type(c) for c in kept} == kinds - {RichProgressBar, RichModelSummary}
    assert any(isinstance(c, ModelCheckpoint) for c in kept)
    assert any(isinstance(c, LearningRateMonitor) for c in kept)
