"""Evaluation plots: ROC, distance histograms, 2-D embeddings, retrieval and pair grids.

Each picture has a ``*_figure`` function returning a ``matplotlib.figure.Figure`` (for
dashboards: ``figure_to_rgb`` turns it into pixels) and a ``plot_*`` function writing it as
a PNG. Every figure is drawn with the Agg canvas and never touches pyplot, so no global
figure state or backend choice leaks into the caller.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from siamese.errors import ConfigError, DataError
from siamese.evaluation.arrays import as_embeddings, to_numpy
from siamese.evaluation.verification import _check_far, _check_pairs, _Roc, format_far
from siamese.exports import atomic_write

PathLike = str | os.PathLike[str]

PROJECTIONS = ("pca", "tsne")

# Colours of retrieved images: right class, wrong class; the query gets a neutral frame.
_RIGHT, _WRONG, _QUERY = "tab:green", "tab:red", "0.3"
_FAR_COLOURS = ("tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


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
    if isinstance(max_points, bool) or not isinstance(max_points, Integral) or max_points < 1:
        raise ConfigError(f"max_points {max_points!r} must be a positive integer, e.g. 5000")
    x = as_embeddings(embeddings, "embeddings", np.float64)
    y = to_numpy(labels)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"labels has shape {tuple(y.shape)} but embeddings has {len(x)} rows; "
            "pass one label per embedding as a 1-D array"
        )
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


def plot_retrieval_grid(
    query_images: Any,
    query_labels: Any,
    gallery_images: Any,
    gallery_labels: Any,
    neighbours: Any,
    path: PathLike,
    *,
    max_queries: int = 8,
) -> Path:
    """``retrieval_grid_figure`` written as a PNG at ``path``."""
    fig = retrieval_grid_figure(
        query_images,
        query_labels,
        gallery_images,
        gallery_labels,
        neighbours,
        max_queries=max_queries,
    )
    return _save(fig, path)


def retrieval_grid_figure(
    query_images: Any,
    query_labels: Any,
    gallery_images: Any,
    gallery_labels: Any,
    neighbours: Any,
    *,
    max_queries: int = 8,
    distances: Any = None,
) -> Figure:
    """One row per query: the query, then its retrieved gallery images in rank order.

    Retrieved images of the query's class get a green frame, others a red one.

    Args:
        query_images: (Q, C, H, W) floats in [0, 1], C = 1 (grey) or 3 (RGB); array or tensor.
        query_labels: (Q,) labels.
        gallery_images: (M, C, H, W) like the queries.
        gallery_labels: (M,) labels.
        neighbours: (Q, k) gallery indices, nearest first.
        max_queries: rows drawn, the first queries.
        distances: optional (Q, k) distances of the neighbours, shown under their labels.
    """
    if isinstance(max_queries, bool) or not isinstance(max_queries, Integral) or max_queries < 1:
        raise ConfigError(f"max_queries {max_queries!r} must be a positive integer, e.g. 8")
    n_queries = _check_image_shape(query_images, "query_images")
    n_gallery = _check_image_shape(gallery_images, "gallery_images")
    q_lab = _check_image_labels(query_labels, n_queries, "query")
    g_lab = _check_image_labels(gallery_labels, n_gallery, "gallery")
    nb = to_numpy(neighbours)
    if nb.ndim != 2 or len(nb) != n_queries or nb.shape[1] == 0:
        raise DataError(
            f"neighbours has shape {tuple(nb.shape)} for {n_queries} queries; expected "
            "(queries, k) gallery indices with k >= 1"
        )
    if not np.issubdtype(nb.dtype, np.integer):
        raise DataError(f"neighbours has dtype {nb.dtype}; expected integer gallery indices")
    if nb.min() < 0 or nb.max() >= n_gallery:
        raise DataError(
            f"neighbours holds indices from {nb.min()} to {nb.max()} but the gallery has "
            f"{n_gallery} images; pass indices into gallery_images"
        )

    dist = None if distances is None else to_numpy(distances).astype(np.float64)
    if dist is not None and dist.shape != nb.shape:
        raise DataError(
            f"distances has shape {tuple(dist.shape)} but neighbours has {tuple(nb.shape)}; "
            "pass one distance per retrieved neighbour"
        )

    rows, k = min(n_queries, int(max_queries)), nb.shape[1]
    nb = nb[:rows]
    # Only the images drawn are converted, so a large gallery costs no extra memory.
    q_img = _pixels(query_images, np.arange(rows), "query_images")
    shown, slot = np.unique(nb, return_inverse=True)
    g_img = _pixels(gallery_images, shown, "gallery_images")[slot.reshape(nb.shape)]
    fig = Figure(figsize=(1.3 * (k + 1), 1.45 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, k + 1, squeeze=False)
    for r in range(rows):
        _show(axes[r, 0], q_img[r], _QUERY, f"query {q_lab[r]}")
        for j, g in enumerate(nb[r]):
            colour = _RIGHT if g_lab[g] == q_lab[r] else _WRONG
            title = f"{j + 1}: {g_lab[g]}"
            if dist is not None:
                title += f"\n{dist[r, j]:.3g}"
            _show(axes[r, j + 1], g_img[r, j], colour, title)
    return fig


def plot_pair_grid(
    first: Any,
    second: Any,
    distances: Any,
    same: Any,
    path: PathLike,
    *,
    threshold: float | None = None,
    max_pairs: int = 16,
) -> Path:
    """``pair_grid_figure`` written as a PNG at ``path``."""
    fig = pair_grid_figure(first, second, distances, same, threshold=threshold, max_pairs=max_pairs)
    return _save(fig, path)


def pair_grid_figure(
    first: Any,
    second: Any,
    distances: Any,
    same: Any,
    *,
    threshold: float | None = None,
    max_pairs: int = 16,
    title: str | None = None,
) -> Figure:
    """Image pairs as columns (first image above the second) with their distance.

    With a threshold, a pair is framed green when the decision ``distance <= threshold``
    matches its label and red when it does not; without one, same pairs are framed green
    and different pairs red. At most 8 pairs a band; bands are stacked.

    Args:
        first: (P, C, H, W) floats in [0, 1], C = 1 or 3; array or tensor.
        second: (P, C, H, W) like ``first``.
        distances: (P,) distance of each pair, lower means more alike.
        same: (P,) bool, True where both images share a class.
        threshold: the verification threshold, if any.
        max_pairs: pairs drawn, the first ones.
        title: a line above the grid.
    """
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, Integral) or max_pairs < 1:
        raise ConfigError(f"max_pairs {max_pairs!r} must be a positive integer, e.g. 16")
    threshold = _check_threshold(threshold)
    n = _check_image_shape(first, "first")
    n_second = _check_image_shape(second, "second")
    d = to_numpy(distances).astype(np.float64)
    s = to_numpy(same)
    if n_second != n or d.shape != (n,) or s.shape != (n,):
        raise DataError(
            f"first has {n} images, second {n_second}, distances shape {tuple(d.shape)} "
            f"and same shape {tuple(s.shape)}; pass one distance and one label per pair"
        )
    if s.dtype != np.bool_:
        raise DataError(f"same has dtype {s.dtype}; expected bool")

    shown = min(n, int(max_pairs))
    a = _pixels(first, np.arange(shown), "first")
    b = _pixels(second, np.arange(shown), "second")
    cols = min(shown, 8)
    bands = -(-shown // cols)
    fig = Figure(figsize=(max(1.3 * cols, 6.0), 2.7 * bands + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * bands, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(shown):
        band, col = divmod(i, cols)
        top, bottom = axes[2 * band, col], axes[2 * band + 1, col]
        if threshold is None:
            colour = _RIGHT if s[i] else _WRONG
        else:
            colour = _RIGHT if (d[i] <= threshold) == s[i] else _WRONG
        kind = "same" if s[i] else "different"
        for ax, image in ((top, a[i]), (bottom, b[i])):
            ax.set_axis_on()
            _show(ax, image, colour, "")
        top.set_title(f"{kind}\nd = {d[i]:.3g}", fontsize="small", color=colour)
    if threshold is not None:
        rule = f"threshold {threshold:.3g}: green decided right, red wrong"
        title = f"{title} ({rule})" if title else rule
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """The figure rendered by its Agg canvas at its own dpi: (H, W, 3) uint8 pixels."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _show(ax: Any, image: np.ndarray, colour: str, title: str) -> None:
    """Draw one (C, H, W) image in a coloured frame without ticks."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)
    ax.set_title(title, fontsize="small", color=colour)


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


def _save(fig: Figure, path: PathLike) -> Path:
    out = Path(path)
    with atomic_write(out) as f:  # a full disk keeps the previous picture, in one line
        fig.savefig(f, format="png", dpi=100)
    return out


def _check_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not np.isfinite(threshold):
        raise ConfigError(f"threshold {threshold!r} must be a finite distance")
    return float(threshold)


def _check_image_shape(images: Any, name: str) -> int:
    """Number of images, after checking for (N, C, H, W) with C = 1 or 3."""
    shape = tuple(getattr(images, "shape", np.shape(images)))
    if len(shape) != 4 or shape[1] not in (1, 3) or 0 in shape:
        hint = " (add the channel axis with images[:, None])" if len(shape) == 3 else ""
        raise DataError(f"{name} has shape {shape}; expected (N, C, H, W) with C = 1 or 3{hint}")
    return shape[0]


def _pixels(images: Any, idx: np.ndarray, name: str) -> np.ndarray:
    """The images at ``idx`` as float64 in [0, 1], after checking their values."""
    images = images if hasattr(images, "detach") else np.asarray(images)
    x = to_numpy(images[idx])
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{name} has dtype {x.dtype}; expected real pixel values")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise DataError(f"{name} has non-finite pixel values; expected floats in [0, 1]")
    low, high = float(x.min()), float(x.max())
    # A little slack for rounding after un-normalising; anything more is a wrong scale.
    if low < -1e-3 or high > 1 + 1e-3:
        raise DataError(
            f"{name} has values from {low:.4g} to {high:.4g}; expected floats in [0, 1]: "
            "undo the normalisation (x * std + mean) or divide 0..255 pixels by 255"
        )
    return np.clip(x, 0.0, 1.0)


def _check_image_labels(labels: Any, n: int, name: str) -> np.ndarray:
    y = to_numpy(labels)
    if y.ndim != 1 or len(y) != n:
        raise DataError(
            f"{name}_labels has shape {tuple(y.shape)} but {name}_images has {n} images; "
            "pass one label per image as a 1-D array"
        )
    return y
