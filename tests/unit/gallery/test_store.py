"""A gallery folder read back as a stranger's data: each damage is one line naming its file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import tiny_checkpoint, write_class_folders

import siamese
from siamese.errors import DataError
from siamese.gallery import Gallery
from siamese.gallery.store import read_folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    ckpt = tiny_checkpoint(base / "m.ckpt", 0.5, image_size=[8, 8])
    images = write_class_folders(base / "imgs", {"a": 2, "b": 2})
    Gallery.build(siamese.load(ckpt), images, ckpt_path=ckpt).save(base / "gal")
    return base / "gal"


@pytest.fixture
def copy(saved, tmp_path):
    folder = tmp_path / "gal"
    shutil.copytree(saved, folder)
    return folder


def test_the_saved_folder_reads_back(saved):
    stored = read_folder(saved)
    assert stored.info["count"] == 4 and stored.index.ntotal == 4
    assert [it.label for it in stored.items] == ["a", "a", "b", "b"]


def one_line(folder) -> str:
    with pytest.raises(DataError) as info:
        read_folder(folder)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_a_truncated_index(copy):
    data = (copy / "index.faiss").read_bytes()
    (copy / "index.faiss").write_bytes(data[: len(data) // 2])
    text = one_line(copy)
    assert "index.faiss" in text and "not a readable faiss index" in text
    assert "rebuild the gallery with index.py" in text


def test_items_rows_not_matching_the_index(copy):
    with open(copy / "items.csv", "a") as f:
        f.write("4,a/extra.png,a,0\n")
    assert "items.csv' has 5 rows but the gallery holds 4 embeddings" in one_line(copy)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ("1,../../etc/passwd,a,0", "not a file inside one of the gallery's 1 root folder"),
        ("1,/etc/passwd,a,0", "not a file inside"),
        ("1,a/x.png,a,7", "names root '7'"),
        ("9,a/x.png,a,0", "has id '9' where 1 belongs"),
        ("1,a/x.png", "has 2 fields, not 4"),
    ],
)
def test_items_rows_that_leave_their_root_or_break_the_order(copy, row, fragment):
    lines = (copy / "items.csv").read_text().splitlines()
    lines[2] = row
    (copy / "items.csv").write_text("\n".join(lines) + "\n")
    text = one_line(copy)
    assert "items.csv' line 3" in text and fragment in text


def test_gallery_json_damage(copy):
    info = json.loads((copy / "gallery.json").read_text())
    (copy / "gallery.json").write_text(json.dumps({**info, "threshold": "0.5"}))
    assert "has threshold='0.5', not a float or int or NoneType" in one_line(copy)
    (copy / "gallery.json").write_text("{not json")
    assert "gallery.json' is not readable JSON" in one_line(copy)
    (copy / "gallery.json").write_text(json.dumps({**info, "count": 3}))
    assert "float32 (4, 4), but gallery.json says 3" in one_line(copy)


def test_embeddings_with_pickled_objects_run_nothing(copy):
    np.save(copy / "embeddings.npy", np.array([object()] * 4), allow_pickle=True)
    text = one_line(copy)
    assert "pickled Python objects" in text and "embeddings.npy" in text


def test_a_missing_file(copy):
    (copy / "items.csv").unlink()
    assert "lacks items.csv" in one_line(copy)
