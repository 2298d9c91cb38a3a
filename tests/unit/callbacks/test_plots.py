"""The dashboard callback: pair pictures, and what a run shows in TensorBoard, offline W&B,
the CSV log and the plots folder."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import wandb_records
from matplotlib.colors import to_rgba
from matplotlib.image import imread

from siamese.callbacks import (
    MAX_TOP_K,
    PICTURES,
    DashboardPlots,
    select_callbacks,
)
from siamese.config import build
from siamese.errors import ConfigError
from siamese.evaluation.plots import figure_to_rgb, pair_grid_figure, plot_pair_grid
from siamese.pipelines.train import run_training

# A run of 3 epochs of 3 batches, pictures every 2nd epoch: drawn after epochs 2 and 3
# (the last) and after test; a small projector subset and retrieval table.
EPOCHS, STEPS_PER_EPOCH = 3, 3


MAX_POINTS, MAX_QUERIES, TOP_K = 300, 4, 3


DASHBOARD = [
    "logger=many",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.log_every_n_steps=1",
    "callbacks.plots.every_n_epochs=2",
    f"callbacks.plots.max_points={MAX_POINTS}",
    f"callbacks.plots.max_queries={MAX_QUERIES}",
    f"callbacks.plots.top_k={TOP_K}",
    # The Rich bar and summary run for real (and need their trainer flags on).
    "trainer.enable_progress_bar=true",
    "trainer.enable_model_summary=true",
]


LAST_STEP = EPOCHS * STEPS_PER_EPOCH  # global step after fit (and at test)


# -- pair pictures ------------------------------------------------------------------------
def test_training_pairs_from_explicit_and_in_batch_batches():
    x1 = torch.arange(6.0).reshape(6, 1, 1, 1).expand(6, 1, 5, 5) / 10
    x2 = 1 - x1
    same = torch.tensor([False, True, False, True, True, False])
    cb = DashboardPlots(num_pairs=4)
    a, b, s = cb._pick_train_pairs((x1, x2, same))
    # Two same pairs first (rows 1, 3), then two different ones (rows 0, 2).
    assert torch.equal(a, x1[[1, 3, 0, 2]]) and torch.equal(b, x2[[1, 3, 0, 2]])
    assert s.tolist() == [True, True, False, False]

    # Only one different pair in the batch: topped up with same pairs.
    a, _, s = cb._pick_train_pairs((x1[1:4], x2[1:4], same[1:4]))
    assert s.tolist() == [True, True, False] and torch.equal(a, x1[[1, 3, 2]])

    images, labels = torch.rand(8, 3, 5, 5) * 1.2 - 0.1, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    a, b, s = cb._pick_train_pairs((images, labels))
    assert a.shape == b.shape == (4, 3, 5, 5) and s.tolist() == [True, True, False, False]
    assert 0 <= a.min() and a.max() <= 1  # augmented pixels clamped for the picture
    rows_a = [int(torch.nonzero((images.clamp(0, 1) == img).flatten(1).all(1))[0]) for img in a]
    rows_b = [int(torch.nonzero((images.clamp(0, 1) == img).flatten(1).all(1))[0]) for img in b]
    assert [labels[i] == labels[j] for i, j in zip(rows_a, rows_b, strict=True)] == s.tolist()


@pytest.mark.parametrize("channels", [1, 3])
def test_pair_grid_picture(tmp_path, channels):
    n = 10  # two bands of up to 8 pairs
    first, second = torch.rand(n, channels, 12, 12), torch.rand(n, channels, 12, 12)
    same = np.arange(n) % 2 == 0
    dist = np.linspace(0.1, 1.0, n)
    fig = pair_grid_figure(first, second, dist, same, threshold=0.5, title="pairs")
    rgb = figure_to_rgb(fig)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[:2] == (int(fig.get_figheight() * 100), int(fig.get_figwidth() * 100))
    # 8 pairs a band: two bands are taller than wide (1.3 inches a column, 2.7 a band).
    assert fig.get_figwidth() == pytest.approx(8 * 1.3)
    assert fig.get_figheight() == pytest.approx(2 * 2.7 + 0.3)
    assert "threshold 0.5" in fig.get_suptitle()
    # Two bands of 8 columns, each an image above its partner: 32 panels. A pair's frame is
    # green where the decision (distance <= threshold) matches its label, red where not.
    assert len(fig.axes) == 2 * 2 * 8
    top = fig.axes[:8]
    names = ["same" if s else "different" for s in same[:8]]
    assert [ax.get_title().split("\n")[0] for ax in top] == names
    right = (dist[:8] <= 0.5) == same[:8]
    frames = [ax.spines["top"].get_edgecolor() for ax in top]
    assert frames == [to_rgba("tab:green" if ok else "tab:red") for ok in right]
    out = tmp_path / "pairs.png"
    assert plot_pair_grid(first.numpy(), second.numpy(), dist, same, out, max_pairs=3) == out
    pixels = imread(out)
    assert pixels.shape[:2] == (300, 600) and pixels.std() > 0  # one band, min width 6 in


def test_pair_grid_rejects_mismatched_inputs():
    images = torch.rand(4, 1, 6, 6)
    with pytest.raises(ValueError, match="one distance and one label per pair"):
        pair_grid_figure(images, images[:3], np.zeros(4), np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="expected floats in \\[0, 1\\]"):
        pair_grid_figure(images * 255, images, np.zeros(4), np.ones(4, dtype=bool))


# -- config -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("every_n_epochs", 0, "positive integer"),
        ("top_k", -1, "positive integer"),
        ("max_points", 1.5, "positive integer"),
        ("projection", "umap", "pca, tsne"),
    ],
)
def test_bad_plot_settings_name_the_key(make_cfg, key, value, expected):
    cfg = make_cfg(f"callbacks.plots.{key}={value}", plots=True)
    with pytest.raises(ConfigError, match=rf"callbacks\.plots\.{key}=.*{expected}"):
        build(cfg.callbacks.plots)


def test_a_huge_plots_top_k_is_capped_with_a_warning(make_cfg, caplog):
    """top_k=100000 drew max_queries x (split - 1) thumbnails (8 x 499), which looked like a
    hang; it is capped at MAX_TOP_K neighbours, with a warning that names the setting."""
    cfg = make_cfg("callbacks.plots.top_k=100000", plots=True)
    with caplog.at_level("WARNING", logger="siamese.callbacks"):
        plots = build(cfg.callbacks.plots)
    assert plots.top_k == MAX_TOP_K == 20
    assert [r.getMessage() for r in caplog.records] == [
        "callbacks.plots.top_k=100000: showing 20 neighbours per query, the most a retrieval "
        "row shows legibly (8 rows of up to 100000 thumbnails would take minutes to draw); "
        "set callbacks.plots.top_k=20 or less to silence this"
    ]
    from siamese.evaluation import Evaluator  # the report's neighbours: MAX_TOP_K a query

    nb = Evaluator(pairs=100).evaluate(torch.rand(500, 4), torch.arange(500) % 10).neighbours
    assert nb.ids.shape == nb.distances.shape == (500, MAX_TOP_K)
    caplog.clear()
    build(make_cfg(f"callbacks.plots.top_k={MAX_TOP_K}", plots=True).callbacks.plots)
    assert not caplog.records  # the cap itself is allowed without a word


# -- a whole run: what each logger and the run directory hold -----------------------------
@pytest.fixture(scope="module")
def dashboard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wandb
    from helpers import FAST_WITH_PLOTS, compose_train

    out = tmp_path_factory.mktemp("dashboard") / "run"
    run_training(compose_train([*FAST_WITH_PLOTS, *DASHBOARD], out))
    wandb.teardown()  # waits until wandb-core has closed the offline run file
    return out


def test_plots_folder_has_every_picture_of_drawn_epochs_only(dashboard_run):
    plots = dashboard_run / "plots"
    # Every 2nd epoch (2), the last one (3) and test; epoch 1 is not drawn.
    assert {p.name for p in plots.iterdir()} == {"val_epoch002", "val_epoch003", "test"}
    for folder in plots.iterdir():
        assert {p.name for p in folder.iterdir()} == {f"{name}.png" for name in PICTURES}
        for png in folder.iterdir():
            pixels = imread(png)
            assert pixels.shape[0] >= 200 and pixels.shape[1] >= 400 and pixels.std() > 0


def test_tensorboard_scalars_images_and_projector(dashboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = dashboard_run / "tensorboard"
    acc = EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss_step", "train/loss_epoch", "train/active_fraction"} <= scalars
    assert {"val/precision_at_1", "val/pos_distance", "val/neg_distance"} <= scalars
    assert {"test/precision_at_1", "test/pos_distance", "test/neg_distance"} <= scalars
    assert any(tag.startswith("lr-") for tag in scalars)
    rates = acc.Scalars("train/images_per_sec")
    assert [e.step for e in rates] == list(range(LAST_STEP))  # log_every_n_steps=1
    assert all(math.isfinite(e.value) and e.value > 0 for e in rates)

    images = set(acc.Tags()["images"])
    assert images == {f"{stage}/plots/{name}" for stage in ("val", "test") for name in PICTURES}
    for name in PICTURES:
        assert [e.step for e in acc.Images(f"val/plots/{name}")] == [6, LAST_STEP]
        (event,) = acc.Images(f"test/plots/{name}")
        assert event.step == LAST_STEP and event.width >= 400 and event.height >= 200

    config = (tb / "projector_config.pbtxt").read_text()
    for stage, size in (("val", 500), ("test", 1000)):  # the embedded subset's splits
        folder = tb / f"{LAST_STEP:05d}" / stage
        assert f'tensor_name: "{stage}:{LAST_STEP:05d}"' in config
        assert f'image_path: "{LAST_STEP:05d}/{stage}/sprite.png"' in config
        tensors = (folder / "tensors.tsv").read_text().splitlines()
        labels = (folder / "metadata.tsv").read_text().splitlines()
        assert len(tensors) == len(labels) == min(MAX_POINTS, size)
        assert {len(row.split("\t")) for row in tensors} == {64}  # model.embedding_dim
        assert set(labels) <= {str(d) for d in range(10)} and len(set(labels)) >= 5
        side = math.ceil(math.sqrt(MAX_POINTS)) * 28  # a square sheet of 28x28 digits
        assert imread(folder / "sprite.png").shape[:2] == (side, side)


def test_wandb_offline_run_has_pictures_table_and_metrics(dashboard_run):
    (run_dir,) = (dashboard_run / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    for stage, count in (("val", 2), ("test", 1)):
        for name in PICTURES:
            assert len(list((media / "images" / stage / "plots").glob(f"{name}_*.png"))) == count

    (table_file,) = (media / "table" / "test" / "plots").glob("neighbours_*.table.json")
    table = json.loads(table_file.read_text())
    columns = table["columns"]
    assert columns[:3] == ["query", "query_label", "hits"]
    assert columns[3:] == [
        f"{kind}_{r}"
        for r in range(1, TOP_K + 1)
        for kind in ("neighbour", "label", "distance", "hit")
    ]
    assert len(table["data"]) == MAX_QUERIES
    for row in table["data"]:
        cell = dict(zip(columns, row, strict=True))
        labels = [cell[f"label_{r}"] for r in range(1, TOP_K + 1)]
        hits = [cell[f"hit_{r}"] for r in range(1, TOP_K + 1)]
        distances = [cell[f"distance_{r}"] for r in range(1, TOP_K + 1)]
        assert hits == [label == cell["query_label"] for label in labels]
        assert cell["hits"] == sum(hits)
        assert distances == sorted(distances)  # nearest first

    history: dict[str, list[Any]] = {}
    artifacts = []
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            for key, value in row.items():
                history.setdefault(key, []).append((row.get("trainer/global_step"), value))
        elif kind == "artifact":
            artifacts.append(record.artifact)
    expected = {"train/images_per_sec", "val/precision_at_1", "val/pos_distance", "test/roc_auc"}
    assert expected <= set(history)
    assert len(history["train/images_per_sec"]) == LAST_STEP
    assert any(key.startswith("lr-") for key in history)
    # Pictures sit on Lightning's x axis, at the step they were drawn.
    assert [s for s, _ in history["val/plots/roc/path"]] == [6, LAST_STEP]
    assert [s for s, _ in history["test/plots/roc/path"]] == [LAST_STEP]
    # W&B keeps a table's images in a run_table artifact: the queries and their neighbours.
    tables = {a.name: a for a in artifacts if a.type == "run_table"}
    (test_table,) = [a for name, a in tables.items() if re.search("testplotsneighbours", name)]
    pngs = [c.path for c in test_table.manifest.contents if c.path.endswith(".png")]
    assert MAX_QUERIES < len(pngs) <= MAX_QUERIES * (TOP_K + 1)


def test_csv_has_throughput_and_validation_rows(dashboard_run):
    with open(dashboard_run / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    rates = [
        (int(r["step"]), float(r["train/images_per_sec"]))
        for r in rows
        if r.get("train/images_per_sec")
    ]
    assert [s for s, _ in rates] == list(range(LAST_STEP)) and all(v > 0 for _, v in rates)
    assert len([r for r in rows if r.get("val/precision_at_1")]) == EPOCHS


@pytest.fixture
def no_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAST turns the progress bar and summary off, so the pipeline must drop the Rich
    callbacks (``select_callbacks``); done here as well in case it does not yet."""
    import siamese.pipelines.train as train

    build_callbacks = train.instantiate_all
    off = {"enable_progress_bar": False, "enable_model_summary": False}
    monkeypatch.setattr(
        train, "instantiate_all", lambda group: select_callbacks(build_callbacks(group), off)
    )


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_explicit_pairs_without_test_draw_the_last_validation(make_cfg, no_rich):
    cfg = make_cfg(
        "data.pair_mode=explicit",
        "loss=contrastive",
        "test=false",
        "trainer.log_every_n_steps=1",
        "callbacks.plots.projector=false",
        plots=True,
    )
    metrics = run_training(cfg)
    plots = Path(cfg.paths.output_dir) / "plots"
    # One epoch, every_n_epochs=10: drawn only because it is the last validation of fit.
    assert {p.name for p in plots.iterdir()} == {"val_epoch001"}
    assert {p.name for p in (plots / "val_epoch001").iterdir()} == {f"{n}.png" for n in PICTURES}
    assert metrics["train/images_per_sec"] > 0


@pytest.mark.slow  # ~5 s: a fit with pictures (default suite under 5 minutes)
def test_partly_evaluated_split_still_draws_its_own_images(make_cfg, no_rich, caplog):
    cfg = make_cfg(
        "test=false",
        "data.eval_batch_size=100",
        "trainer.limit_val_batches=2",  # 200 of the 500 validation items, in shuffled batches
        "callbacks.plots.projector=false",
        plots=True,
    )
    with caplog.at_level("WARNING", logger="siamese.callbacks"):
        run_training(cfg)
    folder = Path(cfg.paths.output_dir) / "plots" / "val_epoch001"
    # The rows carry their item indices, so the retrieval grid shows the right images.
    assert {p.name for p in folder.iterdir()} == {f"{n}.png" for n in PICTURES}
    assert "skipped" not in caplog.text
