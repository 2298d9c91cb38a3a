"""Gallery: hand-placed embeddings on the unit circle (distances are chords, 2 sin(angle / 2)),
searches against brute force, growing a gallery, saving and loading it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import circle, tiny_checkpoint, write_class_folders

import siamese
from siamese.errors import ConfigError, DataError
from siamese.gallery import Gallery


def chord(degrees: float) -> float:
    return 2 * math.sin(math.radians(degrees) / 2)


@pytest.fixture(scope="module")
def model2d(tmp_path_factory):
    """A model embedding into 2 dimensions (euclidean, normalised: the unit circle)."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("m") / "m.ckpt", 0.5, embedding_dim=2)
    return siamese.load(path)


@pytest.fixture
def circle_gallery(model2d) -> Gallery:
    # a at 0, 10, 20 degrees; b at 90, 100; one unlabelled item at 180.
    emb = circle([0, 10, 20, 90, 100, 180]).float()
    return Gallery.from_embeddings(model2d, emb, labels=["a", "a", "a", "b", "b", ""])


def test_search_ranks_by_the_model_distance_ties_to_the_lower_id(circle_gallery):
    (row,) = circle_gallery.search_embeddings(circle([5]).float().numpy(), k=3)
    assert [n.id for n in row] == [0, 1, 2]  # 0 and 1 both 5 degrees away: lower id first
    assert [n.distance for n in row] == pytest.approx([chord(5), chord(5), chord(15)], abs=1e-6)
    assert [n.label for n in row] == ["a", "a", "a"]
    assert [n.same for n in row] == [True, True, True]  # 0.087, 0.087, 0.261 <= 0.5
    far = circle_gallery.search_embeddings(circle([180]).float().numpy(), k=1)[0][0]
    assert far.id == 5 and far.label is None and far.distance == pytest.approx(0, abs=1e-6)


def test_search_equals_brute_force_on_random_embeddings(model2d):
    rng = np.random.default_rng(0)
    gal = circle(rng.uniform(0, 360, 200).tolist()).float()
    queries = circle(rng.uniform(0, 360, 30).tolist()).float().numpy()
    gallery = Gallery.from_embeddings(model2d, gal)
    k = 7
    found = gallery.search_embeddings(queries, k=k)
    brute = np.linalg.norm(queries[:, None, :].astype(np.float64) - gal.numpy()[None], axis=2)
    for q, row in enumerate(found):
        expected = np.lexsort((np.arange(200), brute[q]))[:k]
        assert [n.id for n in row] == expected.tolist()
        assert [n.distance for n in row] == pytest.approx(brute[q, expected], abs=1e-6)
    # k past the gallery size gives every item
    assert len(gallery.search_embeddings(queries[:1], k=500)[0]) == 200


def test_identify_nearest_vote_and_centroid_by_hand(circle_gallery):
    q = circle([5, 95, 135, 50]).float().numpy()
    nearest = circle_gallery.identify_embeddings(q, by="nearest")
    assert [i.label for i in nearest] == ["a", "b", None, None]
    # 135 degrees: the unlabelled item (45 degrees) is left out; b at 100 is 35 degrees away.
    assert nearest[2].nearest == "b" and nearest[2].known is False
    assert [i.distance for i in nearest] == pytest.approx(
        [chord(5), chord(5), chord(35), chord(30)], abs=1e-6
    )
    assert chord(30) > 0.5  # 0.518: at 50 degrees a is nearest but beyond the threshold
    assert (nearest[3].nearest, nearest[3].known) == ("a", False)
    # vote, k=3 at 50 degrees: 20 (a, 30 deg), 10 (a, 40), 90 (b, 40; tie to the lower id)
    # -> a twice; the distance is a's nearest member's.
    (voted,) = circle_gallery.identify_embeddings(q[3:], by="vote", k=3, threshold=0.6)
    assert (voted.label, voted.known) == ("a", True)
    assert voted.distance == pytest.approx(chord(30), abs=1e-6)
    # vote, k=5 at 95 degrees: 90 b, 100 b, 20 a, 10 a, 0 a -> a 3 votes to b's 2.
    (crowd,) = circle_gallery.identify_embeddings(q[1:2], by="vote", k=5, threshold=2.0)
    assert crowd.label == "a" and crowd.distance == pytest.approx(chord(75), abs=1e-6)
    # centroid: a's mean points at 10 degrees, b's at 95 -> at 50: a, 40 degrees away.
    (cent,) = circle_gallery.identify_embeddings(q[3:], by="centroid", threshold=0.7)
    assert cent.label == "a" and cent.distance == pytest.approx(chord(40), abs=1e-6)
    assert cent.as_dict() == {"label": "a", "distance": cent.distance, "known": True}


def test_identify_needs_labels_and_a_threshold(model2d):
    unlabelled = Gallery.from_embeddings(model2d, circle([0, 90]).float())
    with pytest.raises(DataError, match="no item of this gallery has a label"):
        unlabelled.identify_embeddings(circle([0]).float().numpy(), threshold=0.5)
    labelled = Gallery.from_embeddings(model2d, circle([0, 90]).float(), labels=["a", "b"])
    labelled.info["threshold"] = None
    with pytest.raises(ConfigError, match="no calibrated threshold.*threshold="):
        labelled.identify_embeddings(circle([0]).float().numpy())
    with pytest.raises(ConfigError, match="identify.by='knn' is unknown"):
        labelled.identify_embeddings(circle([0]).float().numpy(), by="knn", threshold=1.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A checkpoint taking 8x8 grey images, and two folders of class folders."""
    base = tmp_path_factory.mktemp("g")
    ckpt = tiny_checkpoint(base / "m.ckpt", 0.5, image_size=[8, 8])
    first = write_class_folders(base / "first", {"cat": 3, "dog": 2})
    second = base / "second"
    rng = np.random.default_rng(1)
    for name in ("cat", "owl"):
        (second / name).mkdir(parents=True)
        for i in range(2):
            from PIL import Image

            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                second / name / f"x{i}.png"
            )
    return base, ckpt, first, second


def test_build_from_a_folder_labels_skips_and_round_trips(folders, tmp_path):
    _, ckpt, first, _ = folders
    bad_root = tmp_path / "imgs"
    shutil.copytree(first, bad_root)
    (bad_root / "dog" / "broken.png").write_bytes(b"not a png")
    model = siamese.load(ckpt)
    gallery = Gallery.build(model, bad_root, ckpt_path=ckpt)
    assert [(it.path, it.label) for it in gallery.items] == [
        ("cat/000.png", "cat"),
        ("cat/001.png", "cat"),
        ("cat/002.png", "cat"),
        ("dog/000.png", "dog"),
        ("dog/001.png", "dog"),
    ]
    assert [Path(p).name for p, _ in gallery.bad_files] == ["broken.png"]
    images, _ = siamese.read_images(bad_root / "cat", model)
    expected = model.embed(images).numpy()
    assert np.array_equal(gallery.embeddings[:3], expected)
    assert gallery.item_file(4) == bad_root / "dog" / "001.png"
    assert gallery.item_file(5) is None and gallery.item_file(-1) is None

    gallery.save(tmp_path / "gal")
    assert "broken.png\t" in (tmp_path / "gal" / "bad_files.txt").read_text()
    again = Gallery.load(tmp_path / "gal")
    assert again.items == gallery.items and np.array_equal(again.embeddings, gallery.embeddings)
    assert again.threshold == 0.5 and again.info["checkpoint_sha256"] is not None
    one = images[:1]
    assert again.search(one, k=5) == gallery.search(one, k=5)
    # the image itself first, at (almost) no distance
    assert again.search(one, k=1)[0][0].id == 0
    assert again.search(one, k=1)[0][0].distance == pytest.approx(0, abs=1e-3)


def test_add_embeds_only_new_files_and_equals_one_build_over_the_union(folders):
    _, ckpt, first, second = folders
    model = siamese.load(ckpt)
    grown = Gallery.build(model, first, ckpt_path=ckpt)
    assert grown.add(second) == 4
    assert grown.add(first) == 0 and grown.add(second) == 0  # never indexed twice
    assert grown.add([first / "cat" / "000.png"]) == 0  # the same file by another root
    assert len(grown) == 9 and grown.roots == [str(first), str(second)]
    files = sorted([*first.rglob("*.png"), *second.rglob("*.png")])
    union = Gallery.build(model, files)
    by_file = {grown.item_file(i): grown.embeddings[i] for i in range(len(grown))}
    assert set(by_file) == {union.item_file(i) for i in range(len(union))}
    for i in range(len(union)):
        assert np.array_equal(by_file[union.item_file(i)], union.embeddings[i])
    queries = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for a, b in zip(grown.search(queries, k=9), union.search(queries, k=9), strict=True):
        assert [(grown.item_file(n.id), n.distance, n.label) for n in a] == [
            (union.item_file(n.id), n.distance, n.label) for n in b
        ]


def test_load_refuses_another_checkpoint_by_its_hash(folders, tmp_path):
    _, ckpt, first, _ = folders
    Gallery.build(siamese.load(ckpt), first, ckpt_path=ckpt).save(tmp_path / "gal")
    other = tiny_checkpoint(tmp_path / "other.ckpt", 0.5, image_size=[8, 8], embedding_dim=3)
    with pytest.raises(ConfigError, match=r"is not the checkpoint .* built with \(sha256"):
        Gallery.load(tmp_path / "gal", ckpt_path=other)
    moved = tmp_path / "moved.ckpt"
    shutil.copy(ckpt, moved)
    assert len(Gallery.load(tmp_path / "gal", ckpt_path=moved)) == 5  # same bytes elsewhere


def test_in_memory_images_and_verify(model2d):
    images = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    gallery = Gallery.build(model2d, images, labels=["x", "y", "z"])
    assert [it.path for it in gallery.items] == ["", "", ""] and gallery.item_file(0) is None
    pairs = gallery.verify(images[:2], images[[0, 2]])
    direct = model2d.compare(images[:2], images[[0, 2]]).double().numpy()
    assert [d for d, _ in pairs] == pytest.approx(direct.tolist(), abs=1e-6)
    assert pairs[0][1] is True  # the same image
    assert [s for _, s in gallery.verify(images[:2], images[[0, 2]], threshold=-1.0)] == [
        False,
        False,
    ]
