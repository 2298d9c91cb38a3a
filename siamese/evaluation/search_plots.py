"""The search results figure: each query image with its nearest gallery images and distances.

One row per query: the query (titled with its file name), then its neighbours nearest first,
each with ``d=<distance>`` and its label under the thumbnail and a frame saying whether it
is the same class at the threshold (green), not (red) or undecided without one (grey). Drawn
on the Agg canvas like every evaluation figure (``siamese.evaluation.grids``), never pyplot.
File names and labels come from strangers' folders, so they are drawn as plain text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from siamese.checks import check_int, is_number
from siamese.errors import DataError
from siamese.evaluation.arrays import to_numpy
from siamese.evaluation.grids import _QUERY, _RIGHT, _WRONG, PathLike, _pixels, _save, _show

__all__ = ["save_search_results", "search_results_figure"]

_UNDECIDED = "0.6"  # frame of a neighbour without a same/different decision (no threshold)
_MAX_SIDE = 256  # pixels a thumbnail keeps per side; larger images are subsampled
_MAX_CHARS = 20  # characters of a file name or label shown; longer ones lose their middle


def save_search_results(
    path: PathLike,
    queries: Sequence[Any],
    neighbours: Sequence[Sequence[Any]],
    *,
    titles: Sequence[str] | None = None,
    max_queries: int = 16,
) -> Path:
    """``search_results_figure`` written as a PNG at ``path`` (atomically: a full disk keeps
    the previous picture)."""
    fig = search_results_figure(queries, neighbours, titles=titles, max_queries=max_queries)
    return _save(fig, path)


def search_results_figure(
    queries: Sequence[Any],
    neighbours: Sequence[Sequence[Any]],
    *,
    titles: Sequence[str] | None = None,
    max_queries: int = 16,
) -> Figure:
    """One row per query: the query image, then its neighbours with distance and label.

    Args:
        queries: one image per query, (H, W) or (H, W, C) with C = 1, 3 or 4 (alpha is
            dropped), floats in [0, 1] or uint8; arrays or tensors, sizes may differ.
        neighbours: per query its neighbours, nearest first: mappings or objects with
            ``image`` (an image like the queries, or None where the file cannot be read: an
            empty panel says so), ``distance`` (float) and optionally ``label`` (str or None)
            and ``same`` (bool, or None where there is no threshold).
        titles: per query the text above it (its file name); None: "query 1", "query 2", ...
        max_queries: rows drawn, the first queries; the caller says when some are left out.
    """
    check_int("max_queries", max_queries, 1, ", e.g. 16")
    n = len(queries)
    if n == 0 or len(neighbours) != n or (titles is not None and len(titles) != n):
        got = "no titles" if titles is None else f"{len(titles)} titles"
        raise DataError(
            f"got {n} query images, {len(neighbours)} neighbour lists and {got}; pass one "
            "neighbour list (and one title) per query, at least one query"
        )
    rows = min(n, int(max_queries))
    records = [[_record(nb, r, j) for j, nb in enumerate(neighbours[r])] for r in range(rows)]
    k = max(len(row) for row in records)
    fig = Figure(figsize=(1.5 * (k + 1), 1.75 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, k + 1, squeeze=False)
    for r in range(rows):
        title = f"query {r + 1}" if titles is None else _plain(titles[r])
        _show(axes[r, 0], _image(queries[r], f"queries[{r}]"), _QUERY, "")
        axes[r, 0].set_title(title, fontsize="small", color=_QUERY, parse_math=False)
        for j in range(k):
            ax = axes[r, j + 1]
            if j >= len(records[r]):
                ax.set_axis_off()  # this query has fewer neighbours than the longest row
                continue
            image, distance, label, same = records[r][j]
            colour = _UNDECIDED if same is None else _RIGHT if same else _WRONG
            if image is None:
                _empty(ax, colour)
            else:
                _show(ax, image, colour, "")
            text = f"d={distance:.3g}" + ("" if label is None else f"\n{label}")
            ax.set_xlabel(text, fontsize="small", color=colour, parse_math=False)
    return fig


def _record(nb: Any, row: int, col: int) -> tuple[np.ndarray | None, float, str | None, Any]:
    """(image as (C, H, W) in [0, 1] or None, distance, shortened label or None, same)."""
    where = f"neighbours[{row}][{col}]"
    image, distance = _field(nb, "image", where), _field(nb, "distance", where)
    label, same = _field(nb, "label", where, None), _field(nb, "same", where, None)
    if not is_number(distance):
        raise DataError(f"{where} has distance {distance!r}; expected a finite number")
    if same is not None and not isinstance(same, bool | np.bool_):
        raise DataError(f"{where} has same {same!r}; expected True, False or None")
    shown = None if label is None or str(label) == "" else _plain(str(label))
    pixels = None if image is None else _image(image, f"{where} image")
    return pixels, float(distance), shown, None if same is None else bool(same)


_MISSING = object()


def _field(nb: Any, name: str, where: str, default: Any = _MISSING) -> Any:
    """``nb[name]`` of a mapping or ``nb.name`` of a record; ``default`` when it has none."""
    value = nb.get(name, default) if isinstance(nb, Mapping) else getattr(nb, name, default)
    if value is _MISSING:
        raise DataError(
            f"{where} has no {name!r}; pass a mapping or record with image, distance and "
            "optionally label and same"
        )
    return value


def _image(image: Any, name: str) -> np.ndarray:
    """An (H, W) or (H, W, C) image as (C, H, W) float64 in [0, 1], C = 1 or 3."""
    x = to_numpy(image)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4) or 0 in x.shape:
        hint = " (channels last: image.permute(1, 2, 0))" if x.ndim == 3 else ""
        raise DataError(
            f"{name} has shape {tuple(x.shape)}; expected (H, W) or (H, W, C) with C = 1, 3 "
            f"or 4{hint}"
        )
    step = -(-max(x.shape[:2]) // _MAX_SIDE)  # a thumbnail needs no more pixels than this
    x = x[::step, ::step, :3]
    if x.dtype == np.uint8:
        x = x / 255.0
    return _pixels(x.transpose(2, 0, 1)[None], np.arange(1), name)[0]


def _empty(ax: Any, colour: str) -> None:
    """A framed panel without an image, saying the image could not be read."""
    ax.text(
        0.5,
        0.5,
        "image\nunavailable",
        ha="center",
        va="center",
        fontsize="small",
        color="0.4",
        transform=ax.transAxes,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def _plain(text: str) -> str:
    """``text`` on one line of printable characters, its middle cut to _MAX_CHARS."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    if len(text) <= _MAX_CHARS:
        return text
    half = (_MAX_CHARS - 1) // 2
    return text[:half] + "…" + text[-(_MAX_CHARS - 1 - half) :]
