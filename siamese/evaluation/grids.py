"""Image grids (retrieval rows, image pairs) and the PNG writer every evaluation figure uses.

Figures are drawn with the Agg canvas and never touch pyplot. ``save_png`` renders a figure
once and writes those pixels, so a picture written by ``evaluate.py`` and one written by the
dashboard callback from the same figure are the same file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave

from siamese.checks import check_int, check_labels, is_number
from siamese.errors import ConfigError, DataError
from siamese.evaluation.arrays import to_numpy
from siamese.exports import atomic_write

PathLike = str | os.PathLike[str]

# Colours of retrieved images: right class, wrong class; the query gets a neutral frame.
_RIGHT, _WRONG, _QUERY = "tab:green", "tab:red", "0.3"


def save_png(fig: Figure, path: PathLike) -> np.ndarray:
    """Render ``fig`` once, write it as a PNG at ``path`` (atomically: a full disk keeps the
    previous picture) and return its (H, W, 3) uint8 pixels."""
    rgb = figure_to_rgb(fig)
    with atomic_write(Path(path)) as f:
        imsave(f, rgb, format="png")
    return rgb


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """The figure rendered by its Agg canvas at its own dpi: (H, W, 3) uint8 pixels."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _save(fig: Figure, path: PathLike) -> Path:
    save_png(fig, path)
    return Path(path)


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
    wrong: Any = None,
) -> Figure:
    """One row per query: the query, then its retrieved gallery images in rank order.

    Retrieved images of the query's class get a green frame, others a red one. Rows marked
    ``wrong`` (a top-1 of another class) have their query framed red and titled so.

    Args:
        query_images: (Q, C, H, W) floats in [0, 1], C = 1 (grey) or 3 (RGB); array or tensor.
        query_labels: (Q,) labels.
        gallery_images: (M, C, H, W) like the queries.
        gallery_labels: (M,) labels.
        neighbours: (Q, k) gallery indices, nearest first.
        max_queries: rows drawn, the first queries.
        distances: optional (Q, k) distances of the neighbours, shown under their labels.
        wrong: optional (Q,) bool, the queries the model gets wrong.
    """
    check_int("max_queries", max_queries, 1, ", e.g. 8")
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

    failed = np.zeros(n_queries, dtype=bool) if wrong is None else to_numpy(wrong).astype(bool)
    if failed.shape != (n_queries,):
        raise DataError(
            f"wrong has shape {tuple(failed.shape)} for {n_queries} queries; pass one bool "
            "per query"
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
        if failed[r]:
            _show(axes[r, 0], q_img[r], _WRONG, f"query {q_lab[r]}\nwrong top-1")
        else:
            _show(axes[r, 0], q_img[r], _QUERY, f"query {q_lab[r]}")
        for j, g in enumerate(nb[r]):
            colour = _RIGHT if g_lab[g] == q_lab[r] else _WRONG
            title = f"{j + 1}: {g_lab[g]}"
            if dist is not None:
                title += f"\n{dist[r, j]:.3g}"
            _show(axes[r, j + 1], g_img[r, j], colour, title)
    if wrong is not None:
        failures = int(failed[:rows].sum())
        fig.suptitle(
            f"{rows} queries across the classes; the first {failures}: top-1 of another class",
            fontsize="medium",
        )
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
    check_int("max_pairs", max_pairs, 1, ", e.g. 16")
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
    of = f"{name}_images"
    return check_labels(to_numpy(labels), n, f"{name}_labels", of=of, per="image", rows="images")


def _check_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    if not is_number(threshold):
        raise ConfigError(f"threshold {threshold!r} must be a finite distance")
    return float(threshold)
