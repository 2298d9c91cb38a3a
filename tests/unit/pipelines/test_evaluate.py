"""evaluate's pipeline in process: files in the run directory, numbers that agree with
train.py and with the exported arrays, the calibrated threshold, other data, bad input."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from helpers import (
    EVAL_FAST,
    FAST,
    compose_eval,
    compose_train,
    make_image_folder,
    make_omniglot_set,
)

import siamese
from siamese.data.pairs import sample_pairs
from siamese.errors import ConfigError, DataError
from siamese.evaluation import oneshot_metrics, retrieval_metrics, scored_retrieval_metrics
from siamese.pipelines.evaluate import REPORTED, recall_ks, run_evaluation
from siamese.pipelines.train import run_training


@pytest.fixture(scope="module")
def trained(evaluate_trained: Path) -> Path:
    """The run evaluated below: conftest's ``evaluate_trained``, shared with tests/runs."""
    return evaluate_trained


FILES = [
    "metrics.json",
    "index.faiss",
    "model.ckpt",
    "roc.png",
    "distances.png",
    "embeddings_2d.png",
    "retrieval.png",
    *(f"embeddings/{n}.npy" for n in ("query", "query_labels", "gallery", "gallery_labels")),
]


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    ckpt = trained / "checkpoints" / "best.ckpt"
    report = run_evaluation(compose_eval([f"ckpt_path={ckpt}", *EVAL_FAST], out))
    return out, report


def test_run_directory_holds_every_file_and_bare_metric_names(evaluated):
    out, report = evaluated
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == report
    assert on_disk["protocol"] == "leave-one-out over the test split"
    assert on_disk["index"] == "flat" and on_disk["distance"] == "euclidean"
    # The contract's names, bare; 20-way one-shot is left out: MNIST has 10 classes.
    expected = set(REPORTED) - {"oneshot_20way_1shot", "approx_recall_at_10"}
    expected -= {"accuracy_at_threshold"}
    assert expected <= set(on_disk)
    assert not any(k.startswith("test/") for k in on_disk)
    for key in expected:
        assert math.isfinite(on_disk[key]), key
    assert 0.2 < on_disk["oneshot_5way_1shot"] <= 1.0
    assert 0 < on_disk["oneshot_5way_1shot_ci95"] < 0.1
    assert on_disk["num_queries"] == 1000.0


def test_train_py_and_evaluate_py_report_and_draw_the_same(trained, tmp_path):
    """train.py tested best.ckpt on the test split with the pair count, seeds and one-shot
    episodes given here: the same evaluator, so the same numbers and pictures, exactly."""
    ckpt = trained / "checkpoints" / "best.ckpt"
    episodes = "eval.oneshot.episodes=1000"  # train.py's one-shot episodes
    report = run_evaluation(compose_eval([f"ckpt_path={ckpt}", *EVAL_FAST, episodes], tmp_path))
    tested = json.loads((trained / "metrics.json").read_text())
    names = [k[len("test/") :] for k in tested if k.startswith("test/")]
    # Every number but the logged loss and the training curves' mean pair distances.
    compared = set(names) - {"loss", "pos_distance", "neg_distance"}
    assert {"precision_at_1", "map_at_r", "roc_auc", "threshold", "oneshot_5way_1shot"} <= compared
    assert {k: tested[f"test/{k}"] for k in compared} == {k: report[k] for k in compared}
    # float64 as computed, not the logger's float32 copy (0.7889999747276306 for 0.789).
    p1 = tested["test/precision_at_1"]
    assert p1 == report["precision_at_1"] and p1 == round(p1 * 1000) / 1000  # 1000 queries
    for name in ("roc", "distances", "embeddings_2d", "retrieval"):
        drawn = (trained / "plots" / "test" / f"{name}.png").read_bytes()
        assert drawn == (tmp_path / f"{name}.png").read_bytes(), name


def test_exports_are_the_models_embeddings_and_give_the_reported_numbers(trained, evaluated):
    out, report = evaluated
    emb = out / "embeddings"
    query, labels = np.load(emb / "query.npy"), np.load(emb / "query_labels.npy")
    assert query.shape == (1000, 64) and query.dtype == np.float32
    np.testing.assert_array_equal(np.load(emb / "gallery.npy"), query)  # leave-one-out
    model = siamese.load(trained / "checkpoints" / "best.ckpt")
    splits = model.hparams.config["data"]
    from siamese.config import build

    test = build(splits).read_splits().test
    images, targets = test.__getitems__(list(range(len(test))))
    np.testing.assert_array_equal(labels, targets.numpy())
    np.testing.assert_allclose(query, model.embed(images).numpy(), atol=1e-5)
    again = retrieval_metrics(query, labels, metric="l2", ks=recall_ks(10))
    for name in ("precision_at_1", "recall_at_10", "map_at_r"):
        assert again[name] == report[name]
    index = faiss.read_index(str(out / "index.faiss"))
    assert index.ntotal == 1000 and index.d == 64


def test_model_ckpt_carries_the_calibrated_threshold(trained, evaluated):
    out, report = evaluated
    model = siamese.load(out / "model.ckpt")
    assert float(model.threshold) == pytest.approx(report["threshold"])
    # Fixed-seed pairs of the exported embeddings reproduce the reported accuracy there.
    query = torch.from_numpy(np.load(out / "embeddings" / "query.npy"))
    labels = torch.from_numpy(np.load(out / "embeddings" / "query_labels.npy"))
    pairs = sample_pairs(labels, 500, 0)
    d = (query[pairs.first] - query[pairs.second]).norm(dim=1)
    accuracy = ((d <= report["threshold"]) == pairs.same).float().mean()
    assert float(accuracy) == pytest.approx(report["verification_accuracy"], abs=1e-6)
    # .same answers at that threshold; the original checkpoint keeps its own.
    test = siamese.load(trained / "checkpoints" / "best.ckpt")
    a, b = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    assert torch.equal(model.same(a, b), model.compare(a, b) <= report["threshold"])
    assert torch.allclose(model.compare(a, b), test.compare(a, b))


def test_target_far_picks_a_threshold_with_that_false_accept_rate(trained, tmp_path):
    ckpt = trained / "checkpoints" / "best.ckpt"
    report = run_evaluation(
        compose_eval(
            [f"ckpt_path={ckpt}", *EVAL_FAST, "eval.target_far=0.01", "eval.plots=false"],
            tmp_path,
        )
    )
    query = torch.from_numpy(np.load(tmp_path / "embeddings" / "query.npy"))
    labels = torch.from_numpy(np.load(tmp_path / "embeddings" / "query_labels.npy"))
    pairs = sample_pairs(labels, 500, 0)
    d = (query[pairs.first] - query[pairs.second]).norm(dim=1)
    accepted = d <= report["threshold"]
    far = float((accepted & ~pairs.same).sum() / (~pairs.same).sum())
    assert far <= 0.01
    assert report["threshold_target_far"] == 0.01
    tar = float((accepted & pairs.same).sum() / pairs.same.sum())
    assert report["accuracy_at_threshold"] == pytest.approx(
        (tar * pairs.same.sum() + (1 - far) * (~pairs.same).sum()).item() / 500, abs=1e-6
    )
    assert not (tmp_path / "roc.png").exists()


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_train_gallery_and_approximate_indexes(trained, tmp_path):
    ckpt = trained / "checkpoints" / "best.ckpt"
    base = [f"ckpt_path={ckpt}", *EVAL_FAST, "eval.plots=false"]
    train = run_evaluation(compose_eval([*base, "eval.gallery=train"], tmp_path / "g"))
    assert train["protocol"] == "test split queries against the train split"
    assert np.load(tmp_path / "g" / "embeddings" / "gallery.npy").shape == (3500, 64)
    assert faiss.read_index(str(tmp_path / "g" / "index.faiss")).ntotal == 3500

    flat = run_evaluation(compose_eval(base, tmp_path / "flat"))
    for kind in ("ivf", "hnsw"):
        approx = run_evaluation(compose_eval([*base, f"index={kind}"], tmp_path / kind))
        assert approx["index"] == kind
        assert 0.9 <= approx["approx_recall_at_10"] <= 1.0
        assert approx["precision_at_1"] == pytest.approx(flat["precision_at_1"], abs=0.02)
        assert approx["roc_auc"] == flat["roc_auc"]  # verification does not use the index


def test_an_image_folder_of_new_classes_all_splits(trained, tmp_path):
    make_image_folder(tmp_path / "new", {"a": 6, "b": 6, "c": 5, "d": 6, "e": 6, "lonely": 1})
    ckpt = trained / "checkpoints" / "best.ckpt"
    folder = ["data=image_folder", f"data.root={tmp_path / 'new'}", "data.num_workers=1"]
    with pytest.raises(ConfigError, match=r"takes 1x28x28 images but ImageFolder.* gives 3x64x64"):
        run_evaluation(compose_eval([f"ckpt_path={ckpt}", *folder, *EVAL_FAST], tmp_path / "x"))

    fitted = [*folder, "data.image_size=28", "data.source.channels=1", "eval.split=all"]
    report = run_evaluation(
        compose_eval([f"ckpt_path={ckpt}", *fitted, *EVAL_FAST, "eval.k=5"], tmp_path / "y")
    )
    assert report["num_queries"] == 30.0
    assert report["num_queries_without_positive"] == 1.0  # "lonely": counted, not a crash
    assert "recall_at_10" not in report and "recall_at_5" in report
    assert "oneshot_5way_1shot" in report and "oneshot_20way_1shot" not in report
    assert (tmp_path / "y" / "retrieval.png").is_file()


def test_one_shot_episodes_within_an_alphabet(trained, evaluated, tmp_path, caplog):
    root = tmp_path / "omniglot"
    make_omniglot_set(root, "images_background", {"Alpha": [2] * 4, "Beta": [2] * 4}, size=28)
    make_omniglot_set(root, "images_evaluation", {"Gamma": [3] * 6, "Delta": [2] * 5}, size=28)
    ckpt = trained / "checkpoints" / "best.ckpt"
    data = ["data=omniglot", f"data.root={root}", "data.source.download=false"]
    data += ["data.image_size=28", "data.num_workers=0", "eval.plots=false"]
    report = run_evaluation(
        compose_eval(
            [f"ckpt_path={ckpt}", *data, *EVAL_FAST, "eval.k=5", "eval.oneshot.within=alphabet"],
            tmp_path / "run",
        )
    )
    assert report["oneshot_within"] == "alphabet"
    # Classes: background Alpha, Beta (8), then evaluation Delta (labels 8-12), Gamma (13-18).
    emb = np.load(tmp_path / "run" / "embeddings" / "query.npy")
    labels = np.load(tmp_path / "run" / "embeddings" / "query_labels.npy")
    assert sorted(set(labels.tolist())) == list(range(8, 19))
    groups = np.where(labels < 13, "Delta", "Gamma")
    want = oneshot_metrics(emb, labels, ways=(5, 20), episodes=200, groups=groups)
    # 20-way fits no alphabet (6 and 5 characters): left out, as across 11 classes.
    assert list(want) == ["oneshot_5way_1shot", "oneshot_5way_1shot_ci95"]
    assert report["oneshot_5way_1shot"] == want["oneshot_5way_1shot"]
    assert "oneshot_20way_1shot" not in report

    # auto (the default) follows the checkpoint's oneshot_within: alphabet here...
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["hyper_parameters"]["config"]["oneshot_within"] = "alphabet"
    torch.save(state, tmp_path / "koch_like.ckpt")
    koch_like = [f"ckpt_path={tmp_path / 'koch_like.ckpt'}", *EVAL_FAST, "eval.plots=false"]
    auto = run_evaluation(compose_eval([*koch_like, *data, "eval.k=5"], tmp_path / "auto"))
    assert auto["oneshot_within"] == "alphabet"
    assert auto["oneshot_5way_1shot"] == report["oneshot_5way_1shot"]
    # ... and across the split, with a warning, on digits (no alphabet in "0".."9").
    with caplog.at_level(logging.WARNING, logger="siamese.pipelines.evaluate"):
        digits = run_evaluation(compose_eval(koch_like, tmp_path / "digits"))
    assert digits["oneshot_within"] is None and "oneshot_20way_1shot" not in digits
    assert digits["oneshot_5way_1shot"] == evaluated[1]["oneshot_5way_1shot"]
    assert "one-shot episodes across the split, not the checkpoint's" in caplog.text

    out = evaluated[0]
    with pytest.raises(ConfigError, match=r"within=alphabet needs the split's class names"):
        run_evaluation(
            compose_eval([f"eval.from_run={out}", "eval.oneshot.within=alphabet"], tmp_path / "a")
        )
    with pytest.raises(ConfigError, match=r"eval.oneshot.within='script' is unknown"):
        run_evaluation(compose_eval([f"ckpt_path={ckpt}", "eval.oneshot.within=script"], tmp_path))


@pytest.mark.slow  # ~4 s: a fit and an evaluation (default suite under 5 minutes)
def test_rank_by_head_ranks_every_item_with_the_learned_head(trained, tmp_path):
    out = tmp_path / "learned"
    learned = ["distance=learned", "loss=bce", "trainer.max_epochs=1"]
    run_training(
        compose_train([*FAST, *learned, "trainer.limit_train_batches=3", "test=false"], out)
    )
    ckpt = out / "checkpoints" / "last.ckpt"
    base = [f"ckpt_path={ckpt}", *EVAL_FAST, "eval.plots=false"]
    head = run_evaluation(compose_eval([*base, "eval.rank_by=head"], tmp_path / "head"))
    assert head["rank_by"] == "head" and head["num_queries"] == 1000.0
    emb = np.load(tmp_path / "head" / "embeddings" / "query.npy")
    labels = np.load(tmp_path / "head" / "embeddings" / "query_labels.npy")
    model = siamese.load(ckpt)
    scorer = model.retrieval_scorer()
    # The scorer is the head's distance, pair by pair.
    a, b = torch.from_numpy(emb[:3]), torch.from_numpy(emb[3:8])
    pairs = model.distance.to_distance(
        model.distance.paired(a.repeat_interleave(5, 0), b.repeat(3, 1))
    )
    assert scorer(emb[:3], emb[3:8]) == pytest.approx(pairs.detach().double().view(3, 5).numpy())
    want = scored_retrieval_metrics(emb, labels, scorer=scorer, ks=(1, 5, 10))
    for key, value in want.items():
        assert head[key] == value, key

    euclidean = trained / "checkpoints" / "best.ckpt"
    with pytest.raises(ConfigError, match=r"eval.rank_by=head needs .* uses euclidean"):
        run_evaluation(compose_eval([f"ckpt_path={euclidean}", "eval.rank_by=head"], tmp_path))
    with pytest.raises(ConfigError, match=r"eval.rank_by='faiss' is unknown"):
        run_evaluation(compose_eval([f"ckpt_path={euclidean}", "eval.rank_by=faiss"], tmp_path))


def test_nan_weights_and_impossible_options_are_refused(trained, tmp_path):
    ckpt = trained / "checkpoints" / "best.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    name = next(k for k in state["state_dict"] if k.endswith("weight") and "tower" in k)
    state["state_dict"][name] = torch.full_like(state["state_dict"][name], math.nan)
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(DataError, match=r"non-finite .* for 1000 of the 1000 test images"):
        run_evaluation(compose_eval([f"ckpt_path={tmp_path / 'nan.ckpt'}"], tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"eval.k=2000 is larger than the 999 items"):
        run_evaluation(compose_eval([f"ckpt_path={ckpt}", "eval.k=2000"], tmp_path / "b"))
    with pytest.raises(ConfigError, match="eval.gallery=train searches the train split"):
        run_evaluation(
            compose_eval([f"ckpt_path={ckpt}", "eval.gallery=train", "eval.split=all"], tmp_path)
        )


def test_readme_example_load_embed_a_folder_search(trained, tmp_path):
    make_image_folder(tmp_path / "photos", {"a": 3, "b": 4})
    model = siamese.load(trained / "checkpoints" / "best.ckpt")
    photos, paths = siamese.read_images(tmp_path / "photos", like=model)
    assert photos.shape == (7, 1, 28, 28) and 0 <= photos.min() and photos.max() <= 1
    assert paths == sorted(paths) and all(p.startswith(str(tmp_path)) for p in paths)
    from siamese.evaluation import build_index

    index = build_index(model.embed(photos), metric=model.distance.faiss_metric)
    distances, ids = index.search(model.embed(photos[[4, 1]]).numpy(), 5)
    assert ids[:, 0].tolist() == [4, 1]  # each photo finds itself first
    assert distances[:, 0] == pytest.approx([0, 0], abs=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files in"):
        siamese.read_images(tmp_path / "empty", like=model)


def test_a_split_with_one_class_or_no_pair_is_refused():
    from siamese.data.datasets import TensorImages
    from siamese.pipelines.evaluate import check_eval_split

    images = torch.zeros(4, 1, 8, 8)
    one_class = TensorImages(images, torch.tensor([3, 3, 3, 3]), ["a", "b", "c", "d"])
    with pytest.raises(DataError, match=r"the test split of X has only one class \(4 items\)"):
        check_eval_split(one_class, "test", "X")
    singletons = TensorImages(images, torch.tensor([0, 1, 2, 3]), ["a", "b", "c", "d"])
    with pytest.raises(DataError, match="no class in the val split of X has two items"):
        check_eval_split(singletons, "val", "X")
    check_eval_split(TensorImages(images, torch.tensor([0, 0, 1, 2]), list("abcd")), "test", "X")


def test_a_train_gallery_needs_the_same_classes():
    from siamese.data.datasets import TensorImages
    from siamese.pipelines.evaluate import check_shared_classes

    images, labels = torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 1, 1])
    train = TensorImages(images, labels, ["Latin/a", "Latin/b"])
    check_shared_classes(TensorImages(images, labels, ["Latin/a", "Latin/b"]), train, "test", "X")
    # Same label numbers, other characters: a label match would not be a true match.
    other = TensorImages(images, labels, ["Tengwar/a", "Tengwar/b"])
    with pytest.raises(ConfigError, match="numbers its classes differently from its train split"):
        check_shared_classes(other, train, "test", "X")


@pytest.mark.slow  # ~3 s: a fit and two evaluations (default suite under 5 minutes)
def test_from_run_rescores_saved_embeddings_without_images(evaluated, tmp_path, monkeypatch):
    out, report = evaluated
    # No image may be read: the data module is never built.
    monkeypatch.setattr(
        "siamese.pipelines.evaluate.embedded_inputs",
        lambda *a: pytest.fail("eval.from_run read the data"),
    )
    again = run_evaluation(compose_eval([f"eval.from_run={out}", *EVAL_FAST], tmp_path / "a"))
    # The same embeddings, index and settings give the same numbers to the last digit.
    numbers = [k for k in report if isinstance(report[k], float)]
    assert len(numbers) >= 15
    assert {k: again[k] for k in numbers} == {k: report[k] for k in numbers}
    assert again["checkpoint"] == str(out / "model.ckpt") and again["from_run"] == str(out)
    assert (again["protocol"], again["split"]) == (report["protocol"], report["split"])
    assert not (tmp_path / "a" / "retrieval.png").exists()  # no images to show
    assert (tmp_path / "a" / "roc.png").is_file() and (tmp_path / "a" / "index.faiss").is_file()

    # Other settings: a threshold at a target FAR, and an HNSW index built from the gallery.
    other = run_evaluation(
        compose_eval(
            [f"eval.from_run={out}", "eval.target_far=0.01", "index=hnsw", *EVAL_FAST],
            tmp_path / "b",
        )
    )
    assert other["threshold_target_far"] == 0.01 and other["index"] == "hnsw"
    assert other["roc_auc"] == report["roc_auc"]  # the same pairs and distances
    assert other["approx_recall_at_10"] > 0.9


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("index", "index.faiss"),
        ("query", "query.npy"),
        ("labels", "gallery_labels.npy"),
    ],
)
def test_from_run_with_a_damaged_file_is_one_line_naming_it(
    evaluated, tmp_path, capsys, damage, named
):
    import shutil

    from siamese.cli import report_errors

    out, _ = evaluated
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    target = copy / named if damage == "index" else copy / "embeddings" / named
    data = target.read_bytes()
    if damage == "labels":  # one label short of the gallery
        np.save(target, np.load(target)[:-1])
    else:  # cut in half
        target.write_bytes(data[: len(data) // 2])
    cfg = compose_eval([f"eval.from_run={copy}", *EVAL_FAST], tmp_path / "run")
    with pytest.raises(SystemExit) as exited:
        report_errors(run_evaluation)(cfg)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_from_run_refuses_a_folder_without_embeddings(tmp_path):
    cfg = compose_eval([f"eval.from_run={tmp_path}"], tmp_path / "run")
    with pytest.raises(ConfigError, match="holds no embeddings/ folder"):
        run_evaluation(cfg)


def test_the_printed_table_lists_each_metric_once_in_order(capsys):
    from siamese.pipelines.evaluate import REPORTED
    from siamese.pipelines.report import print_table

    assert len(REPORTED) == len(set(REPORTED))
    metrics = {"m/roc_auc": 0.5, "m/oneshot_5way_1shot": 0.25, "m/zeta": float("nan"), "x": 1.0}
    print_table(metrics, prefix="m/", order=("oneshot_5way_1shot", "roc_auc", "oneshot_5way_1shot"))
    assert capsys.readouterr().out.splitlines() == [
        "test metric         value",
        "------------------  ------",
        "oneshot_5way_1shot  0.2500",
        "roc_auc             0.5000",
        "zeta                nan",
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.oneshot.episodes=1000000000", "eval.oneshot: episodes=1000000000 is more than"),
        ("eval.oneshot.ways=[5,1]", "eval.oneshot: n_way 1 must be an integer >= 2"),
        ("eval.oneshot.seed=-1", "eval.oneshot: seed -1 must be a non-negative integer"),
    ],
)
def test_one_shot_settings_are_checked_before_any_image_is_read(tmp_path, override, message):
    from siamese.pipelines.evaluate import check_eval_config

    cfg = compose_eval(["ckpt_path=unused.ckpt", override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        check_eval_config(cfg.eval)
    # run_evaluation checks them first: the missing checkpoint is not even looked at.
    with pytest.raises(ConfigError, match=message):
        run_evaluation(cfg)
