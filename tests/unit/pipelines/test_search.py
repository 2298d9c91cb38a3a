"""search's pipeline in process: neighbours and identities against brute force, open-set
metrics counted by hand, identify=true on the command line, damaged galleries, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_fragments, compose_config, tiny_checkpoint, write_class_folders
from PIL import Image

import siamese
from search import identify_switch
from siamese.errors import ConfigError, DataError
from siamese.inference import read_images
from siamese.pipelines.index import run_index
from siamese.pipelines.search import run_search

THRESHOLD = 0.5  # the checkpoint's calibrated threshold


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """m.ckpt; g/ (classes a, b, c) indexed into gallery/; queries q/ of a known class (a)
    and an unknown one (z), with a broken file."""
    base = tmp_path_factory.mktemp("search")
    tiny_checkpoint(base / "m.ckpt", THRESHOLD, image_size=[8, 8])
    write_class_folders(base / "g", {"a": 3, "b": 3, "c": 2})
    cfg = compose_config(
        "index", [f"ckpt_path={base / 'm.ckpt'}", f"gallery={base / 'g'}", "num_workers=0"],
        base / "gallery",
    )  # fmt: skip
    run_index(cfg)
    for i, name in enumerate(["a/q0.png", "a/q1.png", "z/q0.png", "z/q1.png", "z/q2.png"]):
        _image(base / "q" / name, seed=i)  # seed 0: a/000.png's pixels (write_class_folders)
    (base / "q" / "z" / "broken.png").write_bytes(b"not an image")
    return base


def search(base: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_config(
        "search", [f"gallery_dir={base / 'gallery'}", f"query={base / 'q'}", *overrides], out
    )
    return run_search(cfg)


def brute_force(base: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Gallery paths, the (queries, items) distance matrix and the query paths, by cdist."""
    model = siamese.load(base / "m.ckpt")
    gallery = sorted(p.relative_to(base / "g").as_posix() for p in (base / "g").rglob("*.png"))
    queries = ["a/q0.png", "a/q1.png", "z/q0.png", "z/q1.png", "z/q2.png"]
    g, _ = read_images([base / "g" / p for p in gallery], like=model)
    q, _ = read_images([base / "q" / p for p in queries], like=model)
    # The model's distance: euclidean between its (normalised) embeddings.
    d = torch.cdist(model.embed(q).double(), model.embed(g).double()).numpy()
    return gallery, d, queries


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_neighbours_are_the_brute_force_ones_and_the_tables_are_capped(base, tmp_path, capsys):
    capsys.readouterr()
    search(base, tmp_path, "k=3", "printed_queries=1")
    gallery, d, queries = brute_force(base)
    rows = read_csv(tmp_path / "results.csv")
    assert list(rows[0]) == ["query", "rank", "id", "path", "label", "distance", "same"]
    assert len(rows) == 5 * 3
    for qi, name in enumerate(queries):
        order = np.argsort(d[qi], kind="stable")[:3]
        got = [r for r in rows if r["query"] == name]
        assert [r["rank"] for r in got] == ["1", "2", "3"]
        assert [r["path"] for r in got] == [gallery[j] for j in order]
        assert [r["label"] for r in got] == [gallery[j][0] for j in order]
        np.testing.assert_allclose([float(r["distance"]) for r in got], d[qi, order], atol=1e-5)
        assert [r["same"] for r in got] == ["yes" if x <= THRESHOLD else "no" for x in d[qi, order]]
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "bad_files.txt").read_text().startswith(str(base / "q" / "z" / "broken.png"))

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "5 queries against 8 gallery items, k=3; same: distance <= 0.5 (calibrated)"
    assert_fragments(lines[1], "1 unreadable queries skipped, listed in", "bad_files.txt")
    assert lines[2] == "query a/q0.png (class a)"
    assert lines[3].split() == ["rank", "path", "label", "distance", "same"]
    best = np.argsort(d[0], kind="stable")[0]
    assert lines[5].split() == ["1", gallery[best], gallery[best][0], f"{d[0, best]:.4f}",
                                "yes" if d[0, best] <= THRESHOLD else "no"]  # fmt: skip
    assert "query a/q1.png" not in out
    assert "... 4 more queries: all of them are in results.csv" in out
    assert f"next: python search.py gallery_dir={base / 'gallery'} query={base / 'q'} " in out


def test_one_image_query_and_a_threshold_given(base, tmp_path):
    query = base / "q" / "a" / "q1.png"
    search(base, tmp_path, f"query={query}", "k=8", "threshold=0.3", "plot_queries=0")
    _, d, _ = brute_force(base)
    rows = read_csv(tmp_path / "results.csv")
    assert {r["query"] for r in rows} == {str(query)} and len(rows) == 8
    np.testing.assert_allclose([float(r["distance"]) for r in rows], np.sort(d[1]), atol=1e-5)
    assert [r["same"] for r in rows] == ["yes" if x <= 0.3 else "no" for x in np.sort(d[1])]
    assert not (tmp_path / "results.png").exists()


def decide_by_hand(gallery: list[str], d: np.ndarray, by: str, k: int) -> list[tuple[str, float]]:
    """(label, distance decided on) per query: the nearest item's, or the most frequent
    label among the k nearest (ties to the label met first) with its nearest member's."""
    decided = []
    for row in d:
        order = np.argsort(row, kind="stable")[: 1 if by == "nearest" else k]
        labels = [gallery[j][0] for j in order]
        counts = {name: labels.count(name) for name in labels}  # in the order met
        name = max(counts, key=lambda n: counts[n])  # max keeps the first of equal counts
        decided.append((name, float(row[order[labels.index(name)]])))
    return decided


@pytest.mark.parametrize("by", ["nearest", "vote"])
def test_identify_decides_and_scores_as_counted_by_hand(base, tmp_path, capsys, by):
    gallery, d, queries = brute_force(base)
    decided = decide_by_hand(gallery, d, by, k=5)
    if by == "vote":  # these queries' votes differ from their nearest item's label
        assert decided != decide_by_hand(gallery, d, "nearest", k=5)
    # A threshold between the queries' decided distances: some accepted, some not.
    ordered = sorted(dist for _, dist in decided)
    threshold = (ordered[2] + ordered[3]) / 2  # not at a distance: float32 rounding
    capsys.readouterr()
    search(base, tmp_path, "identify.enabled=true", f"identify.by={by}", "identify.k=5",
           f"threshold={threshold}", "plot_queries=0")  # fmt: skip
    rows = read_csv(tmp_path / "identities.csv")
    assert list(rows[0]) == ["query", "label", "known", "distance", "nearest", "truth"]
    nearest = [name for name, _ in decided]
    accepted = np.array([dist <= threshold for _, dist in decided])
    assert 0 < accepted.sum() < len(queries)
    assert [r["query"] for r in rows] == queries
    assert [r["nearest"] for r in rows] == nearest
    np.testing.assert_allclose([float(r["distance"]) for r in rows], [x for _, x in decided], 1e-5)
    labels = [n if a else "" for n, a in zip(nearest, accepted, strict=True)]
    assert [r["label"] for r in rows] == labels
    assert [r["known"] for r in rows] == [str(bool(a)) for a in accepted]
    assert [r["truth"] for r in rows] == [q[0] for q in queries]

    # By hand: a/ is in the gallery (mated), z/ is not.
    mated = np.array([q[0] in "abc" for q in queries])
    right = np.array([n == q[0] for n, q in zip(nearest, queries, strict=True)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["identify_by"] == by and metrics["threshold"] == threshold
    assert (metrics["known_queries"], metrics["unknown_queries"]) == (2, 3)
    assert type(metrics["known_queries"]) is int  # a count in metrics.json, not 2.0
    assert metrics["identification_rate"] == right[mated].mean()
    assert metrics["dir"] == (right & accepted)[mated].mean()
    assert metrics["far"] == accepted[~mated].mean()
    assert metrics["rejection_rate"] == pytest.approx((~accepted)[~mated].mean(), abs=1e-12)

    out = capsys.readouterr().out
    assert "query     identity  distance  nearest  truth" in out.replace("-", " ")
    shown = "unknown" if not accepted[2] else nearest[2]
    assert any(line.split()[:2] == ["z/q0.png", shown] for line in out.splitlines())
    assert "open-set identification  value" in out
    assert f"far                      {accepted[~mated].mean():.4f}" in out
    assert "known_queries            2\n" in out  # counts print as counts
    assert "written: results.csv, identities.csv, metrics.json" in out


def test_identify_switch_and_the_composed_config(tmp_path):
    argv = ["identify=true", "identify.by=vote", "k=3", "identify={by: vote}", "query=identify"]
    assert identify_switch(argv) == [
        "identify.enabled=true", "identify.by=vote", "k=3", "identify={by: vote}",
        "query=identify",
    ]  # fmt: skip
    cfg = compose_config("search", identify_switch(["identify=true", "identify.k=3"]), tmp_path)
    assert (cfg.identify.enabled, cfg.identify.by, cfg.identify.k) == (True, "nearest", 3)


@pytest.mark.parametrize(
    ("damage", "file", "fragments"),
    [
        ("truncate", "index.faiss", ["is not a readable faiss index", "rebuild the gallery"]),
        ("row", "items.csv", ["has 9 rows but the gallery holds 8 embeddings"]),
    ],
)
def test_a_damaged_gallery_stops_at_start_naming_the_file(base, tmp_path, damage, file, fragments):
    damaged = tmp_path / "gallery"
    shutil.copytree(base / "gallery", damaged)
    if damage == "truncate":
        data = (damaged / file).read_bytes()
        (damaged / file).write_bytes(data[: len(data) // 2])
    else:
        with open(damaged / file, "a") as f:
            f.write("8,a/000.png,a,0\n")
    out = tmp_path / "run"
    with pytest.raises(DataError) as stopped:
        run_search(compose_config("search", [f"gallery_dir={damaged}", f"query={base / 'q'}"], out))
    assert_fragments(str(stopped.value), f"'{damaged / file}'", *fragments)
    assert not (out / "results.csv").exists()


def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path):
    no_threshold = tmp_path / "plain"
    tiny_checkpoint(tmp_path / "plain.ckpt", None, image_size=[8, 8])
    run_index(compose_config("index", [f"ckpt_path={tmp_path / 'plain.ckpt'}",
              f"gallery={base / 'g'}", "num_workers=0"], no_threshold))  # fmt: skip
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"not an image")
    g, q = f"gallery_dir={base / 'gallery'}", f"query={base / 'q'}"
    cases = [
        ([q], ConfigError, ["gallery_dir is required: python search.py gallery_dir="]),
        ([g], ConfigError, ["query is required: python search.py gallery_dir=", "query=<"]),
        ([g, f"query={tmp_path / 'nope.png'}"], DataError, ["nope.png' does not exist"]),
        ([g, q, "k=0"], ConfigError, ["k must be a positive integer, e.g. k=5, got 0"]),
        ([g, q, "identify.by=foo"], ConfigError, ["identify.by='foo' is unknown; choose one of"]),
        ([g, f"query={tmp_path / 'junk'}"], DataError,
         ["none of the 1 query images could be read", "x.png"]),
        ([f"gallery_dir={no_threshold}", q, "identify.enabled=true"], ConfigError,
         ["this gallery has no calibrated threshold", "pass threshold=<distance>"]),
    ]  # fmt: skip
    for i, (overrides, error, fragments) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(error) as refused:
            run_search(compose_config("search", overrides, out))
        assert_fragments(str(refused.value), *fragments)
        assert not (out / "results.csv").exists()
