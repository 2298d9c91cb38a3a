"""The service's routes on a real gallery: answers checked against brute force on its
embeddings (numpy distances), thumbnails against the files' own pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import png_bytes
from PIL import Image

from siamese.service import ServiceSettings, create_app


@pytest.fixture(scope="module")
def client(gallery):
    with TestClient(create_app(gallery, ServiceSettings(thumbnail_size=8))) as c:
        yield c


def upload(path: Path, field: str = "image") -> dict:
    return {field: (path.name, path.read_bytes(), "image/png")}


def brute_force(gallery, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every item's euclidean distance to ``query`` (D,), nearest first (ties: lower id)."""
    d = np.linalg.norm(gallery.embeddings.astype(np.float64) - query, axis=1)
    order = np.lexsort((np.arange(len(d)), d))
    return order, d[order]


def test_search_answers_the_k_nearest_items_as_brute_force_orders_them(client, gallery):
    query = 5  # dog/001.png: its own item is the nearest, at distance 0
    answer = client.post("/search?k=4", files=upload(gallery.item_file(query)))
    assert answer.status_code == 200, answer.text
    found = answer.json()["neighbours"]
    order, dist = brute_force(gallery, gallery.embeddings[query])
    assert [n["id"] for n in found] == order[:4].tolist()
    assert found[0]["id"] == query and found[0]["distance"] == pytest.approx(0, abs=1e-6)
    assert [n["distance"] for n in found] == pytest.approx(dist[:4], abs=1e-5)
    for n in found:
        item = gallery.items[n["id"]]
        assert (n["path"], n["label"]) == (item.path, item.label)
        assert n["same"] == (n["distance"] <= 0.5)  # the checkpoint's threshold
    assert found[0]["path"] == "dog/001.png" and found[0]["label"] == "dog"


def test_search_without_k_answers_the_default_and_k_past_the_gallery_answers_all(client, gallery):
    path = gallery.item_file(0)
    assert len(client.post("/search", files=upload(path)).json()["neighbours"]) == 5
    everything = client.post("/search?k=100", files=upload(path)).json()["neighbours"]
    assert sorted(n["id"] for n in everything) == list(range(8))


def test_identify_answers_the_nearest_items_label_and_unknown_past_the_threshold(client, gallery):
    known = client.post("/identify", files=upload(gallery.item_file(2))).json()
    assert known == {"label": "cat", "distance": pytest.approx(0, abs=1e-6), "known": True}
    # A black image: its nearest item is further than 0.5 from it.
    black = png_bytes(np.zeros((12, 12), dtype=np.uint8))
    emb = gallery.embed(np.zeros((1, 1, 6, 6), dtype=np.float32))[0]
    _, dist = brute_force(gallery, emb)
    assert dist[0] > 0.5  # the case this test is about
    answer = client.post("/identify", files={"image": ("b.png", black)}).json()
    assert answer == {"label": None, "distance": pytest.approx(dist[0], abs=1e-5), "known": False}


def test_verify_answers_the_models_distance_and_the_verdict_at_the_threshold(client, gallery):
    a, b = gallery.item_file(1), gallery.item_file(6)
    files = {**upload(a, "image_a"), **upload(b, "image_b")}
    answer = client.post("/verify", files=files).json()
    expected = float(np.linalg.norm(gallery.embeddings[1] - gallery.embeddings[6]))
    assert answer["distance"] == pytest.approx(expected, abs=1e-5)
    assert answer["same"] == (expected <= 0.5) and answer["threshold"] == 0.5
    same = client.post("/verify", files={**upload(a, "image_a"), **upload(a, "image_b")})
    assert same.json() == {"distance": pytest.approx(0, abs=1e-6), "same": True, "threshold": 0.5}


def test_embed_answers_the_items_own_embedding(client, gallery):
    answer = client.post("/embed", files=upload(gallery.item_file(3))).json()
    assert np.allclose(answer["embedding"], gallery.embeddings[3], atol=1e-6)


def test_a_threshold_setting_overrides_the_gallerys_in_every_verdict(gallery):
    near = float(np.linalg.norm(gallery.embeddings[1] - gallery.embeddings[6]))
    with TestClient(create_app(gallery, ServiceSettings(threshold=near + 1e-3))) as c:
        a, b = gallery.item_file(1), gallery.item_file(6)
        verdict = c.post("/verify", files={**upload(a, "image_a"), **upload(b, "image_b")})
        assert verdict.json()["same"] is True and verdict.json()["threshold"] == near + 1e-3
        found = c.post("/search?k=8", files=upload(a)).json()["neighbours"]
        assert [n["same"] for n in found] == [n["distance"] <= near + 1e-3 for n in found]
        assert c.get("/health").json()["model"]["threshold"] == near + 1e-3


def test_thumbnail_is_a_small_png_of_the_items_own_pixels(client, gallery):
    answer = client.get("/items/4/thumbnail")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(answer.content))
    assert thumb.format == "PNG" and thumb.mode == "L" and thumb.size == (8, 8)  # 12 -> 8
    original = Image.open(gallery.item_file(4)).convert("L")
    expected = np.asarray(original.resize((8, 8), Image.BILINEAR), dtype=np.int16)
    assert np.abs(np.asarray(thumb, dtype=np.int16) - expected).max() <= 1


def test_health_names_the_item_count_and_the_model_without_server_paths(client, gallery_files):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["items"] == 8
    model = body["model"]
    assert model["checkpoint"] == "tiny.ckpt" and str(gallery_files[0].parent) not in str(body)
    assert model["distance"] == "euclidean" and model["embedding_dim"] == 4
    assert model["image_shape"] == [1, 6, 6] and model["threshold"] == 0.5
    assert len(model["checkpoint_sha256"]) == 64


def test_the_page_and_the_openapi_docs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="image-input"', 'id="image-b-input"', 'id="neighbours"'):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing external
    spec = client.get("/openapi.json").json()
    assert {"/search", "/identify", "/verify", "/embed", "/health"} <= set(spec["paths"])
    assert "/items/{item_id}/thumbnail" in spec["paths"]
    assert client.get("/docs").status_code == 200
