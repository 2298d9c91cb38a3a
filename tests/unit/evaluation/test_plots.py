"""Evaluation plots: each writes a readable PNG, the PCA helper by hand, and bad inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from siamese.errors import ConfigError, DataError
from siamese.evaluation.plots import (
    distance_histograms_figure,
    embeddings_2d_figure,
    plot_distance_histograms,
    plot_embeddings_2d,
    plot_retrieval_grid,
    plot_roc,
    project_2d,
    roc_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path, expected: Path) -> np.ndarray:
    """Check the file is the PNG asked for and return its pixels, (H, W, channels)."""
    assert path == expected
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3
    assert 100 <= pixels.shape[0] <= 2000 and 100 <= pixels.shape[1] <= 2000
    assert pixels.std() > 0  # something was drawn
    return pixels


def pairs(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.3
    distances = np.where(same, rng.normal(0.5, 0.2, n), rng.normal(1.2, 0.3, n))
    return distances, same


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """Plots must not leave figures in pyplot's global registry (nor import it at all)."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []


def test_roc(tmp_path):
    distances, same = pairs()
    out = tmp_path / "sub" / "roc.png"
    pixels = read_png(plot_roc(distances, same, out, threshold=0.8), out)
    assert pixels.shape[:2] == (450, 600)
    # What is drawn: one log-FAR panel, a dotted line at each target FAR and the
    # threshold's operating point at the TAR and FAR counted here.
    (ax,) = roc_figure(distances, same, threshold=0.8).axes
    assert ax.get_xscale() == "log"
    dotted = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"]
    assert dotted == [1e-3, 1e-2]
    (star,) = [line for line in ax.lines if line.get_marker() == "*"]
    tar, far = np.mean(distances[same] <= 0.8), np.mean(distances[~same] <= 0.8)
    assert (star.get_xdata()[0], star.get_ydata()[0]) == pytest.approx((far, tar))
    assert star.get_label().startswith(f"threshold 0.8: TAR {tar:.3f}, FAR {far:.2g}")


def test_roc_with_far_zero_points(tmp_path):
    # Perfectly separated: TAR reaches 1 at FAR 0, which a log axis cannot show as such;
    # also a FAR target of 0 and a threshold with FAR 0.
    distances = np.array([0.1, 0.2, 0.3, 0.9, 1.0])
    same = np.array([True, True, True, False, False])
    out = tmp_path / "roc.png"
    read_png(plot_roc(distances, same, out, threshold=0.5, target_fars=(0.0, 1e-3)), out)
    # FAR 0 sits at the left edge: half the smaller of 1 / 2 different pairs and 1e-3.
    (ax,) = roc_figure(distances, same, threshold=0.5, target_fars=(0.0, 1e-3)).axes
    assert ax.get_xlim()[0] == pytest.approx(5e-4)
    dotted = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"]
    assert dotted == pytest.approx([5e-4, 1e-3])
    (star,) = [line for line in ax.lines if line.get_marker() == "*"]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == pytest.approx((5e-4, 1.0))


def test_roc_accepts_tensors_and_a_string_path(tmp_path):
    distances, same = pairs()
    out = plot_roc(
        torch.from_numpy(distances).float(), torch.from_numpy(same), str(tmp_path / "r.png")
    )
    read_png(out, tmp_path / "r.png")


def test_distance_histograms(tmp_path):
    distances, same = pairs()
    out = tmp_path / "distances.png"
    read_png(plot_distance_histograms(distances, same, out, threshold=0.9), out)
    # One panel: two histograms of sqrt(400) = 20 shared bins, one dashed threshold line.
    (ax,) = distance_histograms_figure(distances, same, threshold=0.9).axes
    same_bars, diff_bars = ax.containers
    assert len(same_bars) == len(diff_bars) == 20
    assert [b.get_x() for b in same_bars] == [b.get_x() for b in diff_bars]
    (dashed,) = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert list(dashed.get_xdata()) == [0.9, 0.9]
    labels = [text.get_text() for text in ax.get_legend().texts]
    assert labels == [f"same ({same.sum()})", f"different ({(~same).sum()})", "threshold 0.9"]


def test_distance_histograms_all_equal(tmp_path):
    out = tmp_path / "d.png"
    read_png(plot_distance_histograms(np.ones(6), np.arange(6) % 2 == 0, out), out)
    # No threshold, no line; the single value gets bins from 0.5 to 1.5.
    (ax,) = distance_histograms_figure(np.ones(6), np.arange(6) % 2 == 0).axes
    assert ax.lines == [] or all(line.get_linestyle() != "--" for line in ax.lines)
    bars = ax.containers[0]
    assert bars[0].get_x() == pytest.approx(0.5)
    assert bars[-1].get_x() + bars[-1].get_width() == pytest.approx(1.5)


@pytest.mark.parametrize("n_classes", [3, 30])  # with and without a legend
def test_embeddings_2d_pca(tmp_path, n_classes):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((300, 16))
    labels = rng.integers(0, n_classes, 300)
    out = tmp_path / "emb.png"
    read_png(plot_embeddings_2d(emb, labels, out, max_points=100), out)
    # One panel of 100 of the 300 points: a scatter and legend entry per class up to 20.
    (ax,) = embeddings_2d_figure(emb, labels, max_points=100).axes
    assert ax.get_title() == "PCA of 100 of 300 embeddings"
    assert sum(len(c.get_offsets()) for c in ax.collections) == 100
    if n_classes <= 20:
        shown = sorted(int(t.get_text()) for t in ax.get_legend().texts)
        assert len(ax.collections) == len(shown) and set(shown) <= set(range(n_classes))
    else:
        assert ax.get_legend() is None and len(ax.collections) == 1


@pytest.mark.slow  # ~2 s: t-SNE (default suite under 5 minutes)
def test_embeddings_2d_tsne(tmp_path):
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 0.1, (12, 5)), rng.normal(3, 0.1, (12, 5))])
    labels = np.array(["a"] * 12 + ["b"] * 12)
    out = tmp_path / "tsne.png"
    read_png(plot_embeddings_2d(torch.from_numpy(emb), labels, out, method="tsne"), out)
    xy = project_2d(emb, method="tsne", seed=1)
    assert xy.shape == (24, 2)
    np.testing.assert_array_equal(xy, project_2d(emb, method="tsne", seed=1))


def test_pca_of_points_on_a_line():
    # Points c + t v with |v| = 3: the first component is 3 (t - mean t), up to a sign
    # fixed by the direction's largest entry (v's last entry, 2, is positive), the second 0.
    t = np.array([-2.0, 0.0, 1.0, 5.0])
    v = np.array([1.0, -2.0, 2.0, 0.0])
    c = np.array([10.0, 3.0, -1.0, 7.0])
    xy = project_2d(c + t[:, None] * v)
    np.testing.assert_allclose(xy[:, 0], 3 * (t - t.mean()), atol=1e-12)
    np.testing.assert_allclose(xy[:, 1], 0.0, atol=1e-12)


def test_pca_of_a_rectangle():
    # A 4 x 1 rectangle's corners in 3-D, rotated: the long side is the first component.
    corners = np.array([[-2.0, -0.5], [2, -0.5], [2, 0.5], [-2, 0.5]])
    a = np.pi / 6
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    points = np.c_[corners, np.zeros(4)] @ rotation.T + 5.0
    xy = project_2d(points)
    np.testing.assert_allclose(np.abs(xy), np.abs(corners), atol=1e-12)
    assert project_2d(np.array([[1.0], [2.0], [4.0]]))[:, 1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("channels", [1, 3])
def test_retrieval_grid(tmp_path, channels):
    rng = np.random.default_rng(0)
    queries = rng.random((10, channels, 8, 8)).astype(np.float32)
    gallery = torch.rand(20, channels, 12, 12)
    neighbours = rng.integers(0, 20, (10, 4))
    out = tmp_path / "retrieval.png"
    written = plot_retrieval_grid(
        queries, np.arange(10) % 3, gallery, torch.arange(20) % 3, neighbours, out, max_queries=3
    )
    pixels = read_png(written, out)
    assert pixels.shape[1] > pixels.shape[0]  # 3 rows of 5 images: wider than tall
    # Right retrievals are framed green, wrong ones red: both colours appear.
    rgb = (pixels[..., :3] * 255).round().astype(int)
    assert (np.abs(rgb - [44, 160, 44]).sum(axis=-1) < 10).any()  # tab:green
    assert (np.abs(rgb - [214, 39, 40]).sum(axis=-1) < 10).any()  # tab:red


def test_bad_pairs(tmp_path):
    with pytest.raises(DataError, match="both same and different pairs"):
        plot_roc(np.ones(3), np.ones(3, dtype=bool), tmp_path / "x.png")
    with pytest.raises(DataError, match="non-finite"):
        plot_distance_histograms(
            np.array([np.nan, 1.0]), np.array([True, False]), tmp_path / "x.png"
        )
    with pytest.raises(ConfigError, match="threshold"):
        plot_roc(*pairs(), tmp_path / "x.png", threshold=float("nan"))
    with pytest.raises(ConfigError, match="false accept rate"):
        plot_roc(*pairs(), tmp_path / "x.png", target_fars=(2.0,))
    assert not (tmp_path / "x.png").exists()


def test_bad_embeddings(tmp_path):
    emb = np.zeros((5, 3))
    with pytest.raises(ConfigError, match="method 'umap' is not supported"):
        plot_embeddings_2d(emb, np.zeros(5), tmp_path / "x.png", method="umap")
    with pytest.raises(DataError, match="labels has shape \\(4,\\) but embeddings has 5 rows"):
        plot_embeddings_2d(emb, np.zeros(4), tmp_path / "x.png")
    emb[0, 0] = np.inf
    with pytest.raises(DataError, match="1 non-finite values"):
        plot_embeddings_2d(emb, np.zeros(5), tmp_path / "x.png")
    with pytest.raises(ConfigError, match="max_points 0"):
        plot_embeddings_2d(emb, np.zeros(5), tmp_path / "x.png", max_points=0)


def test_tsne_without_scikit_learn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import raises ImportError
    with pytest.raises(ConfigError, match="pip install scikit-learn"):
        project_2d(np.zeros((5, 2)), method="tsne")


def test_bad_retrieval_inputs(tmp_path):
    images, labels = np.full((4, 1, 6, 6), 0.5), np.arange(4)
    pixels_0_255 = np.linspace(0, 255, 4 * 36).reshape(4, 1, 6, 6)
    nb = np.zeros((4, 2), dtype=int)
    out = tmp_path / "x.png"
    with pytest.raises(DataError, match=r"images\[:, None\]"):
        plot_retrieval_grid(images[:, 0], labels, images, labels, nb, out)
    with pytest.raises(DataError, match="C = 1 or 3"):
        plot_retrieval_grid(np.zeros((4, 2, 6, 6)), labels, images, labels, nb, out)
    with pytest.raises(DataError, match="from 0 to 255; expected floats in \\[0, 1\\]"):
        plot_retrieval_grid(pixels_0_255, labels, images, labels, nb, out)
    with pytest.raises(DataError, match="gallery has 4 images"):
        plot_retrieval_grid(images, labels, images, labels, nb + 4, out)
    with pytest.raises(DataError, match="neighbours has shape \\(3, 2\\) for 4 queries"):
        plot_retrieval_grid(images, labels, images, labels, nb[:3], out)
    with pytest.raises(DataError, match="query_labels has shape"):
        plot_retrieval_grid(images, labels[:3], images, labels, nb, out)
    with pytest.raises(ConfigError, match="max_queries"):
        plot_retrieval_grid(images, labels, images, labels, nb, out, max_queries=0)


def test_retrieval_grid_content_and_the_png_writer(tmp_path):
    from siamese.evaluation.plots import retrieval_grid_figure, save_png

    rng = np.random.default_rng(1)
    images = rng.random((6, 1, 8, 8))
    neighbours = np.array([[1, 2], [0, 3], [4, 5]])
    fig = retrieval_grid_figure(
        images[:3], [0, 1, 2], images, [0, 0, 1, 1, 2, 2], neighbours, wrong=[True, False, False]
    )
    assert len(fig.axes) == 3 * 3  # three rows: the query and its two neighbours
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "query 0\nwrong top-1" and titles[3] == "query 1"
    assert titles[1:3] == ["1: 0", "2: 1"]  # rank: label
    assert fig.axes[0].spines["left"].get_edgecolor() == pytest.approx(
        (214 / 255, 39 / 255, 40 / 255, 1), abs=1e-3
    )
    assert fig.get_suptitle() == "3 queries across the classes; the first 1: top-1 of another class"
    with pytest.raises(DataError, match="pass one bool per query"):
        retrieval_grid_figure(images[:3], [0, 1, 2], images, [0] * 6, neighbours, wrong=[True])
    # save_png: the pixels it returns are the file's.
    rgb = save_png(fig, tmp_path / "grid.png")
    np.testing.assert_array_equal((imread(tmp_path / "grid.png")[..., :3] * 255).round(), rgb)
