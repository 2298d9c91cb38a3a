"""index.py and search.py run as a user runs them: build, add, search and identify on a small
gallery; mode=add equal to one build over the union; a damaged gallery and another
checkpoint stopped in one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_fragments,
    one_line_error,
    run_script,
    run_scripts,
    tiny_checkpoint,
    write_class_folders,
)
from PIL import Image

import siamese
from siamese.gallery import Gallery
from siamese.inference import read_images


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.mark.slow  # five entry-point processes (~8 s each, two at a time); tests/unit/pipelines
def test_index_add_search_identify_as_a_user_runs_them(tmp_path):  # checks the same in process
    ckpt = tiny_checkpoint(tmp_path / "m.ckpt", 0.5, image_size=[8, 8])
    other = tiny_checkpoint(tmp_path / "other.ckpt", 0.3, image_size=[8, 8])
    g, out = write_class_folders(tmp_path / "g", {"a": 3, "b": 3, "c": 2}), tmp_path / "gallery"
    (g / "b" / "broken.png").write_bytes(b"not an image")
    built = run_script(
        "index.py", f"ckpt_path={ckpt}", f"gallery={g}", f"hydra.run.dir={out}", "num_workers=0"
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert "Traceback" not in built.stderr
    lines = built.stdout.splitlines()
    assert_fragments(lines[-4], "indexed 8 images of", "in 3 classes", "1 unreadable skipped")
    assert lines[-3:-1] == [
        f"run folder: {out}",
        f"next: python search.py gallery_dir={out} query={g / 'a' / '000.png'}",
    ]
    assert json.loads((out / "run.json").read_text())["task"] == "index"

    # New images in the folder; a damaged copy and a copy for another checkpoint.
    for i, name in enumerate(["a/new.png", "d/000.png", "d/001.png"]):
        _image(g / name, seed=100 + i)
    damaged, copy = tmp_path / "damaged", tmp_path / "copy"
    shutil.copytree(out, damaged)
    shutil.copytree(out, copy)
    (damaged / "index.faiss").write_bytes((damaged / "index.faiss").read_bytes()[:60])
    queries = tmp_path / "q"
    for i, name in enumerate(["a/q0.png", "z/q0.png", "z/q1.png"]):
        _image(queries / name, seed=i)
    added, broken, refused = run_scripts(
        [
            ("index.py", ["mode=add", f"gallery_dir={out}", f"gallery={g}", "num_workers=0",
                          f"hydra.run.dir={tmp_path / 'add'}"]),
            ("search.py", [f"gallery_dir={damaged}", f"query={queries}",
                           f"hydra.run.dir={tmp_path / 'bad1'}"]),
            ("index.py", ["mode=add", f"gallery_dir={copy}", f"gallery={g}",
                          f"ckpt_path={other}", f"hydra.run.dir={tmp_path / 'bad2'}"]),
        ]
    )  # fmt: skip
    assert added.returncode == 0, added.stderr[-3000:]
    assert_fragments(
        added.stdout.splitlines()[0], "added 3 images of", f"to {out} (8 already", "11 in all"
    )
    assert_fragments(one_line_error(broken), f"'{damaged / 'index.faiss'}'", "rebuild the gallery")
    assert_fragments(one_line_error(refused), f"ckpt_path='{other}' is not the", "(sha256 ")
    assert not (tmp_path / "bad1" / "results.csv").exists()

    search = run_script(
        "search.py", f"gallery_dir={out}", f"query={queries}", "k=3", "identify=true",
        "identify.by=vote", f"hydra.run.dir={tmp_path / 'search'}",
    )  # fmt: skip
    assert search.returncode == 0, search.stderr[-3000:]
    assert "query     identity  distance  nearest  truth" in search.stdout
    assert "open-set identification  value" in search.stdout
    run = tmp_path / "search"
    for name in ("results.csv", "results.png", "identities.csv", "metrics.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["known_queries"], metrics["unknown_queries"]) == (1, 2)

    # mode=add equals one build over the union: items by path, embeddings, search answers.
    model = siamese.load(ckpt)
    union = Gallery.build(model, g, ckpt_path=ckpt)
    grown = Gallery.load(out)
    by_path = {it.path: (it.label, grown.embeddings[it.id]) for it in grown.items}
    assert sorted(by_path) == [it.path for it in union.items]
    for it in union.items:
        assert by_path[it.path][0] == it.label
        np.testing.assert_allclose(by_path[it.path][1], union.embeddings[it.id], atol=1e-6)
    images, _ = read_images([queries / p for p in ["a/q0.png", "z/q0.png", "z/q1.png"]], model)
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name, want in zip(["a/q0.png", "z/q0.png", "z/q1.png"], union.search(images, 3),
                          strict=True):  # fmt: skip
        got = [r for r in rows if r["query"] == name]
        assert [r["path"] for r in got] == [n.path for n in want]
        np.testing.assert_allclose([float(r["distance"]) for r in got],
                                   [n.distance for n in want], atol=1e-5)  # fmt: skip
