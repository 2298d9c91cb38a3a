"""The search results figure: panels per row, texts under them, frames, missing images, the
row cut, stranger file names, bad input and the PNG writer."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.image import imread

from siamese.errors import ConfigError, DataError
from siamese.evaluation.search_plots import save_search_results, search_results_figure

GREEN, RED, GREY = to_rgba("tab:green"), to_rgba("tab:red"), to_rgba("0.6")


@dataclass
class Record:
    image: np.ndarray | None
    distance: float
    label: str | None
    same: bool | None


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """The figure must not leave figures in pyplot's global registry."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []


def example():
    """Two queries (grey float, RGB uint8) with three neighbours each, every kind once."""
    rng = np.random.default_rng(0)
    grey, rgb = rng.random((6, 6)), rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    neighbours = [
        [
            {"image": rng.random((6, 6)), "distance": 0.1234, "label": "cat", "same": True},
            {"image": None, "distance": 0.5, "label": "dog", "same": False},
            Record(rng.random((4, 4, 1)), 2.0, None, None),
        ],
        [
            {"image": torch.rand(3, 3, 3), "distance": np.float32(0.25), "same": np.bool_(False)},
            {"image": rgb, "distance": 1e-5, "label": "cat", "same": True},
            {"image": rgb[..., :1], "distance": 12.345, "label": "", "same": None},
        ],
    ]
    return [grey, rgb], neighbours


def test_panels_texts_and_frames():
    queries, neighbours = example()
    fig = search_results_figure(queries, neighbours, titles=["a.png", "b.jpg"])
    axes = fig.axes
    assert len(axes) == 2 * (3 + 1)  # rows x (query + k neighbours)
    assert [axes[0].get_title(), axes[4].get_title()] == ["a.png", "b.jpg"]
    under = [ax.get_xlabel() for ax in axes]
    assert under == [
        "",
        "d=0.123\ncat",
        "d=0.5\ndog",
        "d=2",
        "",
        "d=0.25",
        "d=1e-05\ncat",
        "d=12.3",
    ]
    frames = [axes[i].spines["bottom"].get_edgecolor() for i in (1, 2, 3, 5, 6, 7)]
    assert frames == [GREEN, RED, GREY, RED, GREEN, GREY]
    # The query frame is the neutral dark grey; images are drawn, the missing one is not.
    assert axes[0].spines["top"].get_edgecolor() == to_rgba("0.3")
    assert [len(ax.images) for ax in axes] == [1, 1, 0, 1, 1, 1, 1, 1]
    assert [t.get_text() for t in axes[2].texts] == ["image\nunavailable"]
    # uint8 is scaled to [0, 1]; a 1-channel image is drawn in grey.
    np.testing.assert_allclose(axes[4].images[0].get_array(), queries[1] / 255.0)
    assert axes[3].images[0].get_cmap().name == "gray"


def test_default_titles_max_queries_and_short_rows():
    rng = np.random.default_rng(1)
    queries = [rng.random((4, 4)) for _ in range(5)]
    one = {"image": rng.random((4, 4)), "distance": 0.3, "label": "x", "same": True}
    neighbours = [[one, one], [one], [], [one, one], [one, one]]
    fig = search_results_figure(queries, neighbours, max_queries=3)
    assert len(fig.axes) == 3 * (2 + 1)  # rows 4 and 5 left out; k is the longest row's
    assert [fig.axes[i].get_title() for i in (0, 3, 6)] == ["query 1", "query 2", "query 3"]
    # Panels beyond a short row's neighbours are blank.
    on = [ax.axison for ax in fig.axes]
    assert on == [True, True, True, True, True, False, True, False, False]


def test_stranger_names_are_plain_text():
    image = np.zeros((3, 3))
    name = "$\\frac{a}{b}$ and a very long name indeed.png"
    nb = [{"image": image, "distance": 0.1, "label": "$x^2$\nnew line", "same": None}]
    fig = search_results_figure([image], [nb], titles=[name])
    assert fig.axes[0].get_title() == "$\\frac{a}…indeed.png"  # 20 characters, middle cut
    assert fig.axes[1].get_xlabel() == "d=0.1\n$x^2$?new line"
    fig.canvas.draw()  # mathtext would fail on "$\frac{a}{b}$ ..." cut in the middle


def test_large_images_are_subsampled():
    big = np.zeros((1000, 600), dtype=np.uint8)
    fig = search_results_figure([big], [[]])
    assert fig.axes[0].images[0].get_array().shape == (250, 150)  # every 4th pixel


def test_bad_inputs():
    image = np.zeros((3, 3))
    ok = {"image": image, "distance": 0.1}
    with pytest.raises(DataError, match="got 1 query images, 2 neighbour lists"):
        search_results_figure([image], [[ok], [ok]])
    with pytest.raises(DataError, match="and 2 titles"):
        search_results_figure([image], [[ok]], titles=["a", "b"])
    with pytest.raises(DataError, match="at least one query"):
        search_results_figure([], [])
    with pytest.raises(ConfigError, match="max_queries 0"):
        search_results_figure([image], [[ok]], max_queries=0)
    with pytest.raises(DataError, match=r"queries\[0\] has shape \(1, 5, 5\).*permute"):
        search_results_figure([torch.zeros(1, 5, 5)], [[ok]])
    with pytest.raises(DataError, match=r"neighbours\[0\]\[1\] has no 'distance'"):
        search_results_figure([image], [[ok, {"image": image}]])
    with pytest.raises(DataError, match=r"neighbours\[0\]\[0\] has distance nan"):
        search_results_figure([image], [[{"image": image, "distance": float("nan")}]])
    with pytest.raises(DataError, match="has same 'yes'; expected True, False or None"):
        search_results_figure([image], [[{**ok, "same": "yes"}]])
    with pytest.raises(DataError, match=r"queries\[0\] has values from 0 to 240; expected floats"):
        search_results_figure([np.arange(9.0).reshape(3, 3) * 30], [[ok]])


def test_save_writes_the_figure_as_png(tmp_path):
    queries, neighbours = example()
    out = tmp_path / "sub" / "results.png"
    assert save_search_results(out, queries, neighbours, titles=["a", "b"]) == out
    pixels = imread(out)
    assert pixels.shape[:2] == (350, 600)  # 1.75 in per row, 1.5 in per column, 100 dpi
    rgb = (pixels[..., :3] * 255).round().astype(int)
    for colour in (GREEN, RED):
        assert (np.abs(rgb - np.round(np.array(colour[:3]) * 255)).sum(axis=-1) < 10).any()
    assert [p.name for p in out.parent.iterdir()] == ["results.png"]  # no temporary left
