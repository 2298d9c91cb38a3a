"""index's pipeline in process: a gallery folder of a folder of images, mode=add equal to
one build over the union, the index group beside the primary config, refusals in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_fragments, compose_config, fake_run, tiny_checkpoint, write_class_folders
from PIL import Image

import siamese
from siamese import run_dirs
from siamese.errors import ConfigError, DataError
from siamese.evaluation.index import index_kind
from siamese.gallery import Gallery
from siamese.inference import read_images
from siamese.pipelines.index import run_index
from siamese.pipelines.search import load_gallery

GALLERY_FILES = ("index.faiss", "items.csv", "gallery.json", "embeddings.npy", "bad_files.txt")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A checkpoint (8x8 grey images) and a gallery folder of 3 classes with a broken file."""
    base = tmp_path_factory.mktemp("index")
    tiny_checkpoint(base / "m.ckpt", 0.5, image_size=[8, 8])
    write_class_folders(base / "g", {"a": 3, "b": 3, "c": 2})
    (base / "g" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    return base


def index(out: Path, *overrides: str) -> dict:
    """run_index as index.py runs it, after the run-folder guard recorded the job."""
    cfg = compose_config("index", ["num_workers=0", *overrides], out)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs.write_record(out, "index")
    return run_index(cfg)


@pytest.fixture(scope="module")
def built(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built")
    index(out, f"ckpt_path={base / 'm.ckpt'}", f"gallery={base / 'g'}")
    return out


def test_the_index_group_sits_beside_the_primary_config(tmp_path):
    # conf/index.yaml and the group conf/index/ (evaluate.py's index=) compose together.
    assert compose_config("index", [], tmp_path).index.kind == "flat"
    ivf = compose_config("index", ["index=ivf", "index.nlist=2"], tmp_path).index
    assert (ivf.kind, ivf.nlist) == ("ivf", 2)
    assert compose_config("index", ["index=hnsw"], tmp_path).index.hnsw_m == 32
    assert compose_config("evaluate", ["index=hnsw"], tmp_path).index.kind == "hnsw"


def test_build_writes_the_gallery_and_names_the_next_commands(base, built, capsys, tmp_path):
    for name in GALLERY_FILES:
        assert (built / name).is_file(), name
    gallery = Gallery.load(built)
    paths = [it.path for it in gallery.items]
    assert paths == ["a/000.png", "a/001.png", "a/002.png", "b/000.png", "b/001.png",
                     "b/002.png", "c/000.png", "c/001.png"]  # fmt: skip
    assert [it.label for it in gallery.items] == [p[0] for p in paths]
    assert gallery.bad_files[0][0] == str(base / "g" / "b" / "broken.png")
    assert gallery.info["checkpoint"] == str(base / "m.ckpt")
    # The embeddings are the model's own, of the files decoded as the model reads them.
    images, _ = read_images([base / "g" / p for p in paths], like=siamese.load(base / "m.ckpt"))
    expected = siamese.load(base / "m.ckpt").embed(images).numpy()
    np.testing.assert_allclose(gallery.embeddings, expected, atol=1e-6)

    out = tmp_path / "again"
    capsys.readouterr()
    result = index(out, f"ckpt_path={base / 'm.ckpt'}", f"gallery={base / 'g'}", "index=ivf")
    assert result == {"items": 8, "skipped": 1, "gallery_dir": str(out)}
    assert index_kind(Gallery.load(out).index) == "ivf"
    lines = capsys.readouterr().out.splitlines()
    assert_fragments(
        lines[0], "indexed 8 images of", "in 3 classes, index: ivf", "1 unreadable skipped",
        str(out / "bad_files.txt"),
    )  # fmt: skip
    assert lines[1:] == [
        f"run folder: {out}",
        f"next: python search.py gallery_dir={out} query={base / 'g' / 'a' / '000.png'}",
        f"      python serve.py gallery_dir={out}  (a web page and an API)",
    ]


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_add_equals_one_build_over_the_union(base, tmp_path, capsys):
    grown = tmp_path / "g"
    shutil.copytree(base / "g", grown)
    out = tmp_path / "gallery"
    index(out, f"ckpt_path={base / 'm.ckpt'}", f"gallery={grown}")
    before = np.load(out / "embeddings.npy")
    for i, name in enumerate(["a/new.png", "d/000.png", "d/001.png"]):
        _image(grown / name, seed=100 + i)
    capsys.readouterr()
    added = index(tmp_path / "add", "mode=add", f"gallery_dir={out}", f"gallery={grown}")
    assert added == {"items": 11, "added": 3, "already": 8, "skipped": 1}
    assert_fragments(
        capsys.readouterr().out.splitlines()[0],
        "added 3 images of", f"to {out} (8 already indexed; 11 in all)", "1 unreadable skipped",
    )  # fmt: skip
    union = tmp_path / "union"
    index(union, f"ckpt_path={base / 'm.ckpt'}", f"gallery={grown}")

    grown_gallery, one_build = Gallery.load(out), Gallery.load(union)
    np.testing.assert_array_equal(grown_gallery.embeddings[:8], before)  # not embedded again
    by_path = {it.path: (it.label, grown_gallery.embeddings[it.id]) for it in grown_gallery.items}
    assert sorted(by_path) == [it.path for it in one_build.items]
    for it in one_build.items:
        label, emb = by_path[it.path]
        assert label == it.label
        np.testing.assert_allclose(emb, one_build.embeddings[it.id], atol=1e-6)
    queries = torch.rand((5, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for got, want in zip(grown_gallery.search(queries, 11), one_build.search(queries, 11),
                         strict=True):  # fmt: skip
        assert [n.path for n in got] == [n.path for n in want]
        np.testing.assert_allclose([n.distance for n in got], [n.distance for n in want], 1e-5)

    capsys.readouterr()
    again = index(tmp_path / "add2", "mode=add", f"gallery_dir={out}", f"gallery={grown}")
    assert again == {"items": 11, "added": 0, "already": 11, "skipped": 1}
    assert "keeps the gallery's own index" not in capsys.readouterr().out
    # Other index settings than the gallery's: the add grows its own index and says so.
    index(tmp_path / "add3", "mode=add", f"gallery_dir={out}", f"gallery={grown}", "index=hnsw")
    assert capsys.readouterr().out.splitlines()[0] == (
        "mode=add keeps the gallery's own index (flat) and adds to it; index=hnsw applies to "
        "a new gallery (mode=build)"
    )
    assert Gallery.load(out).info["index"] == {"kind": "flat"}


def test_refusals_are_one_line(base, built, tmp_path):
    ckpt, g = f"ckpt_path={base / 'm.ckpt'}", f"gallery={base / 'g'}"
    (tmp_path / "empty").mkdir()
    search_run = fake_run(tmp_path / "search_run", "search", "results.csv")
    (tmp_path / "bare").mkdir()
    other = tiny_checkpoint(tmp_path / "other.ckpt", 0.3, image_size=[8, 8])
    cases = [
        (["mode=foo", ckpt, g], ConfigError, ["mode='foo' is unknown; choose build", "or add"]),
        ([g], ConfigError, ["ckpt_path is required: python index.py ckpt_path="]),
        ([ckpt], ConfigError, ["gallery is required: python index.py ckpt_path=..."]),
        ([ckpt, f"gallery={base / 'm.ckpt'}"], DataError, ["m.ckpt' is not a folder"]),
        ([ckpt, f"gallery={tmp_path / 'nope'}"], DataError, ["nope' does not exist"]),
        ([ckpt, f"gallery={tmp_path / 'empty'}"], DataError, ["holds no image files"]),
        (["mode=add", g], ConfigError, ["mode=add needs gallery_dir: python index.py mode=add"]),
        (["mode=add", f"gallery_dir={search_run}", g], ConfigError,
         ["holds a run of search.py", "made by index.py"]),
        (["mode=add", f"gallery_dir={tmp_path / 'bare'}", g], ConfigError,
         ["holds no run of index.py"]),
        (["mode=add", f"gallery_dir={built}", g, f"ckpt_path={other}"], ConfigError,
         [f"ckpt_path='{other}' is not the checkpoint the gallery in", "(sha256 ",
          f"pass that checkpoint ({base / 'm.ckpt'})"]),
    ]  # fmt: skip
    before = {name: (built / name).read_bytes() for name in GALLERY_FILES}
    for i, (overrides, error, fragments) in enumerate(cases):
        with pytest.raises(error) as refused:
            index(tmp_path / f"run{i}", *overrides)
        assert_fragments(str(refused.value), *fragments)
        assert not (tmp_path / f"run{i}" / "gallery.json").exists()
    assert before == {name: (built / name).read_bytes() for name in GALLERY_FILES}


def test_a_gallery_being_written_refuses_another_add_and_a_search(base, built, tmp_path):
    # Another process holds the folder's lock, as index.py mode=add does while it adds.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(built / run_dirs.LOCK)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as refused:
            index(tmp_path / "add", "mode=add", f"gallery_dir={built}", f"gallery={base / 'g'}")
        assert_fragments(str(refused.value), f"gallery_dir='{built}' is in use by a running job")
        search = compose_config("search", [f"gallery_dir={built}", f"query={base / 'g'}"], tmp_path)
        with pytest.raises(ConfigError) as refused:
            load_gallery(search)
        assert_fragments(str(refused.value), "is being written by a running job", "once that ends")
    finally:
        holder.kill()
        holder.wait()


HOLD_LOCK = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises at once if this test still held it
os.write(fd, json.dumps({"pid": 1, "host": "h", "started": "t", "command": "x"}).encode())
print("locked", flush=True)
time.sleep(60)
"""
