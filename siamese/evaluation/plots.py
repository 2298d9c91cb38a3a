"""Evaluation plots: ROC, distance histograms and 2-D embeddings (image grids: ``grids``).

Each picture has a ``*_figure`` function returning a ``matplotlib.figure.Figure`` (for
dashboards: ``figure_to_rgb`` turns it into pixels) and a ``plot_*`` function writing it as
a PNG (``save_png``). Every figure is drawn with the Agg canvas and never touches pyplot, so
no global figure state or backend choice leaks into the caller. The retrieval and pair grids
live in ``siamese.evaluation.grids`` and are importable from here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from siamese.checks import check_int, check_labels
from siamese.errors import ConfigError, DataError
from siamese.evaluation.arrays import as_embeddings, to_numpy
from siamese.evaluation.grids import (
    PathLike,
    _check_threshold,
    _save,
    figure_to_rgb,
    pair_grid_figure,
    plot_pair_grid,
    plot_retrieval_grid,
    retrieval_grid_figure,
    save_png,
)
from siamese.evaluation.verification import _check_far, _check_pairs, _Roc, format_far

PROJECTIONS = ("pca", "tsne")
_FAR_COLOURS = ("tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")

__all__ = [
    "PROJECTIONS",
    "distance_histograms_figure",
    "embeddings_2d_figure",
    "figure_to_rgb",
    "pair_grid_figure",
    "plot_distance_histograms",
    "plot_embeddings_2d",
    "plot_pair_grid",
    "plot_retrieval_grid",
    "plot_roc",
    "project_2d",
    "retrieval_grid_figure",
    "roc_figure",
    "save_png",
]


def plot_roc(
    distances: Any,
    same: Any,
    path: PathLike,
    *,
    threshold: float | None = None,
    target_fars: Sequence[float] = (1e-3, 1e-2),
) -> Path:
    """``roc_figure`` written as a PNG at ``path``."""
    return _save(roc_figure(distances, same, threshold=threshold, target_fars=target_fars), path)


def roc_figure(
    distances: Any,
    same: Any,
    *,
    threshold: float | None = None,
    target_fars: Sequence[float] = (1e-3, 1e-2),
) -> Figure:
    """ROC curve, TAR against FAR on a log axis, with its AUC and TAR at each target FAR.

    A log axis cannot show FAR 0, so those points are drawn at the left edge, half the
    smallest FAR the pairs can resolve (1 / different pairs) or half the smallest target.

    Args:
        distances: (P,) distance per pair, lower means more alike.
        same: (P,) bool, True where both items share a class.
        threshold: if given, the operating point of accepting distance <= threshold.
        target_fars: FARs marked with a dotted line and the TAR reached there.
    """
    fars = [_check_far(far) for far in target_fars]
    threshold = _check_threshold(threshold)
    roc = _Roc.from_pairs(distances, same)
    floor = 0.5 / roc.num_diff
    positive_targets = [far for far in fars if far > 0]
    if positive_targets:
        floor = min(floor, 0.5 * min(positive_targets))

    fig, ax = _figure(6.0, 4.5)
    ax.plot(
        np.maximum(roc.far, floor),
        roc.tar,
        color="tab:blue",
        lw=2,
        label=f"ROC (AUC = {roc.auc():.4f})",
    )
    chance = np.logspace(np.log10(floor), 0, 200)
    ax.plot(chance, chance, color="0.6", ls="--", lw=1, label="chance")
    for i, far in enumerate(fars):
        colour = _FAR_COLOURS[i % len(_FAR_COLOURS)]
        tar = roc.tar_at_far(far)
        x = max(far, floor)
        ax.axvline(x, color=colour, ls=":", lw=1)
        ax.plot([x], [tar], "o", color=colour, label=f"TAR@FAR≤{format_far(far)} = {tar:.3f}")
    if threshold is not None:
        d, s = _check_pairs(distances, same)
        tar, far = float(np.mean(d[s] <= threshold)), float(np.mean(d[~s] <= threshold))
        ax.plot(
            [max(far, floor)],
            [tar],
            "*",
            color="tab:red",
            ms=14,
            label=f"threshold {threshold:.4g}: TAR {tar:.3f}, FAR {far:.2g}",
        )
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("false accept rate (log; FAR 0 drawn at the left edge)")
    ax.set_ylabel("true accept rate")
    ax.set_title(f"ROC: {roc.num_same} same, {roc.num_diff} different pairs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def plot_distance_histograms(
    distances: Any, same: Any, path: PathLike, *, threshold: float | None = None
) -> Path:
    """``distance_histograms_figure`` written as a PNG at ``path``."""
    return _save(distance_histograms_figure(distances, same, threshold=threshold), path)


def distance_histograms_figure(
    distances: Any, same: Any, *, threshold: float | None = None
) -> Figure:
    """Density histograms of same-pair and different-pair distances on shared bins."""
    threshold = _check_threshold(threshold)
    d, s = _check_pairs(distances, same)
    low, high = float(d.min()), float(d.max())
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    if high <= low:  # all distances equal: give the single bar some width
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, int(np.clip(np.sqrt(len(d)), 10, 100)) + 1)

    fig, ax = _figure(6.0, 4.0)
    ax.hist(d[s], bins=bins, density=True, alpha=0.55, color="tab:green", label=f"same ({s.sum()})")
    ax.hist(
        d[~s],
        bins=bins,
        density=True,
        alpha=0.55,
        color="tab:red",
        label=f"different ({(~s).sum()})",
    )
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("distance")
    ax.set_ylabel("density")
    ax.set_title("pair distances")
    ax.legend(fontsize="small")
    return fig


def plot_embeddings_2d(
    embeddings: Any,
    labels: Any,
    path: PathLike,
    *,
    method: str = "pca",
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """``embeddings_2d_figure`` written as a PNG at ``path``."""
    fig = embeddings_2d_figure(embeddings, labels, method=method, max_points=max_points, seed=seed)
    return _save(fig, path)


def embeddings_2d_figure(
    embeddings: Any,
    labels: Any,
    *,
    method: str = "pca",
    max_points: int = 5000,
    seed: int = 0,
) -> Figure:
    """Scatter of a 2-D projection of the embeddings coloured by class.

    Args:
        embeddings: (M, D) embeddings.
        labels: (M,) class labels; a legend is drawn for at most 20 classes.
        method: "pca" (numpy SVD) or "tsne" (scikit-learn, seeded).
        max_points: at most this many points, a random subset fixed by ``seed``.
        seed: seed of the subset and of t-SNE.
    """
    if method not in PROJECTIONS:
        raise ConfigError(f"method {method!r} is not supported; expected one of {PROJECTIONS}")
    check_int("max_points", max_points, 1, ", e.g. 5000")
    x = as_embeddings(embeddings, "embeddings", np.float64)
    y = check_labels(to_numpy(labels), len(x))
    total = len(x)
    if total > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), int(max_points), replace=False))
        x, y = x[keep], y[keep]
    xy = project_2d(x, method=method, seed=seed)  # (M, 2)

    classes, codes = np.unique(y, return_inverse=True)
    codes = codes.reshape(-1)
    fig, ax = _figure(6.5, 5.5)
    size = float(np.clip(3000 / len(xy), 2, 30))
    if len(classes) <= 20:
        cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for c, name in enumerate(classes):
            pts = xy[codes == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=size, color=cmap(c), label=str(name), lw=0)
        ax.legend(
            fontsize="small",
            markerscale=max(1.0, 20 / size),
            loc="center left",
            bbox_to_anchor=(1, 0.5),
        )
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=codes, cmap="turbo", lw=0)
    name = "PCA" if method == "pca" else "t-SNE"
    shown = f"{len(xy)} embeddings" if len(xy) == total else f"{len(xy)} of {total} embeddings"
    ax.set_title(f"{name} of {shown}")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def project_2d(embeddings: Any, *, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(M, 2) coordinates: the top two principal components, or a seeded t-SNE.

    PCA centres the rows and projects them on the first two right singular vectors, each
    signed so that its largest-magnitude entry is positive (deterministic); a component
    that does not exist (D == 1, or a single point) is all zeros.
    """
    if method not in PROJECTIONS:
        raise ConfigError(f"method {method!r} is not supported; expected one of {PROJECTIONS}")
    x = as_embeddings(embeddings, "embeddings", np.float64)
    if method == "tsne":
        return _tsne(x, seed)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # (min(M, D), D)
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
    out = np.zeros((len(x), 2))
    n = min(2, len(vt))
    out[:, :n] = centred @ vt[:n].T
    return out


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise ConfigError(
            "method 'tsne' needs scikit-learn, which is not installed; "
            "`pip install scikit-learn` or use method 'pca'"
        ) from err
    if len(x) < 3:
        raise DataError(f"t-SNE needs at least 3 points, got {len(x)}; use method 'pca'")
    # sklearn requires perplexity < n; 30 is its default for larger sets. Below a few
    # hundred points Barnes-Hut saves nothing, and the exact gradient runs without OpenMP,
    # whose threads can stall for seconds on a busy machine.
    perplexity = min(30.0, (len(x) - 1) / 3)
    method = "exact" if len(x) <= 200 else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", method=method, random_state=seed)
    return tsne.fit_transform(x).astype(np.float64)


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()
