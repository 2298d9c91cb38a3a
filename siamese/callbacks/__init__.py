"""Callbacks for what a run shows and how it fails, one file per job.

``throughput``: ``Throughput`` logs ``train/images_per_sec`` at the trainer's logging points.
``signals``: ``StopSignals`` writes ``last.ckpt`` at the end of the batch a SIGTERM, a Ctrl-C
or a requeue signal came in, then stops (or requeues); the stages' exit on a signal. The
periodic ``last.ckpt`` saves are a ``ModelCheckpoint`` in conf/callbacks/default.yaml.
``divergence``: ``DivergenceGuard`` stops a run at the first non-finite loss or gradient,
before any checkpoint is written from broken weights, and warns once about a collapse.
``plots``: ``DashboardPlots`` draws pictures of the evaluated split for the run directory,
TensorBoard and W&B.
``BackboneFreeze`` (``siamese.finetuning``) keeps a pretrained backbone frozen for the
first epochs.
``selection``: ``select_callbacks`` drops the progress bar and model summary the trainer
flags switch off.
"""

from siamese.callbacks.divergence import (
    COLLAPSE_SPREAD,
    DivergenceError,
    DivergenceGuard,
    divergence_message,
    embedding_spread,
    grad_total,
    reads_are_free,
)
from siamese.callbacks.plots import MAX_TOP_K, PICTURES, DashboardPlots
from siamese.callbacks.selection import select_callbacks
from siamese.callbacks.signals import StopSignalled, StopSignals, parse_signal
from siamese.callbacks.throughput import Throughput, batch_images
from siamese.finetuning import BackboneFreeze

__all__ = [
    "COLLAPSE_SPREAD",
    "MAX_TOP_K",
    "PICTURES",
    "BackboneFreeze",
    "DashboardPlots",
    "DivergenceError",
    "DivergenceGuard",
    "StopSignalled",
    "StopSignals",
    "Throughput",
    "batch_images",
    "divergence_message",
    "embedding_spread",
    "grad_total",
    "parse_signal",
    "reads_are_free",
    "select_callbacks",
]
