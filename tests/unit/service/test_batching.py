"""Concurrent requests: the same answers as one by one, gathered into one forward pass.

The first forward pass is held until the others have queued behind it, so that which
requests share a batch is certain, not a matter of timing."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from helpers import tiny_model

from siamese.gallery import Gallery
from siamese.service import ServiceSettings, create_app


class HeldForwardPasses:
    """Wraps ``gallery.embed``: records each pass's batch size; the first waits until
    ``waiting`` jobs are queued behind it (or 10 s)."""

    def __init__(self, gallery: Gallery, app, waiting: int) -> None:
        self.embed = gallery.embed
        self.batcher = app.state.batcher
        self.waiting = waiting
        self.sizes: list[int] = []

    def __call__(self, images):
        if not self.sizes:
            deadline = time.monotonic() + 10
            while self.batcher.pending() < self.waiting and time.monotonic() < deadline:
                time.sleep(0.005)
        self.sizes.append(len(images))
        return self.embed(images)


def post_all(client, requests: list[tuple[str, dict]]) -> list:
    """Send the requests from as many threads at once; the answers in order."""
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(client.post, path, files=files) for path, files in requests]
        return [f.result(timeout=30) for f in futures]


def assert_same_answers(together: list, alone: list) -> None:
    """Equal JSON, distances and embeddings to float32 rounding (a batch of 8 goes through
    other kernels than a batch of 1)."""
    assert len(together) == len(alone)
    for a, b in zip(together, alone, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key == "neighbours":
                for n, m in zip(a[key], b[key], strict=True):
                    assert n == {**m, "distance": pytest.approx(m["distance"], abs=1e-5)}
            else:
                assert a[key] == pytest.approx(b[key], abs=1e-5)


def image(gallery, i: int, field: str = "image") -> dict:
    return {field: (f"{i}.png", gallery.item_file(i).read_bytes())}


def test_concurrent_searches_share_one_forward_pass_and_answer_as_one_by_one(gallery, monkeypatch):
    app = create_app(gallery)
    requests = [(f"/search?k={3 + i % 2}", image(gallery, i)) for i in range(8)]
    with TestClient(app) as client:
        alone = [client.post(path, files=files).json() for path, files in requests]
        held = HeldForwardPasses(gallery, app, waiting=7)
        monkeypatch.setattr(gallery, "embed", held)
        together = [answer.json() for answer in post_all(client, requests)]
    assert_same_answers(together, alone)
    assert held.sizes == [1, 7]  # the first alone, the 7 that queued meanwhile in one pass
    assert [len(a["neighbours"]) for a in together] == [3, 4] * 4


def test_a_batch_holds_at_most_max_size_requests(gallery, monkeypatch):
    app = create_app(gallery, ServiceSettings(batch_max_size=3, batch_max_wait_ms=0))
    held = HeldForwardPasses(gallery, app, waiting=6)
    monkeypatch.setattr(gallery, "embed", held)
    with TestClient(app) as client:
        answers = post_all(client, [("/embed", image(gallery, i)) for i in range(7)])
    assert [a.status_code for a in answers] == [200] * 7
    assert held.sizes == [1, 3, 3]
    assert app.state.batcher.largest == 3


def test_a_lone_request_does_not_wait_for_company(gallery):
    # However long a busy batch may wait for more, a request on an idle service starts at once.
    app = create_app(gallery, ServiceSettings(batch_max_wait_ms=1000))
    with TestClient(app) as client:
        client.post("/embed", files=image(gallery, 0))  # warm-up
        start = time.perf_counter()
        answer = client.post("/embed", files=image(gallery, 1))
        elapsed = time.perf_counter() - start
    assert answer.status_code == 200
    assert elapsed < 0.9, elapsed  # a 1 s wait would show
    assert app.state.batcher.batches == 2 and app.state.batcher.largest == 1


def test_a_mixed_batch_answers_each_kind_and_a_failing_kind_fails_alone(gallery_files, monkeypatch):
    # A gallery without a threshold: identify cannot decide, the others can.
    _, root = gallery_files
    no_threshold = Gallery.build(tiny_model(), root)
    assert no_threshold.threshold is None
    app = create_app(no_threshold)
    verify = {**image(no_threshold, 1, "image_a"), **image(no_threshold, 2, "image_b")}
    requests = [
        ("/search?k=2", image(no_threshold, 0)),
        ("/identify", image(no_threshold, 3)),
        ("/verify", verify),
        ("/embed", image(no_threshold, 4)),
        ("/search?k=2", image(no_threshold, 5)),
    ]
    with TestClient(app) as client:
        alone = [client.post(path, files=files) for path, files in requests]
        held = HeldForwardPasses(no_threshold, app, waiting=4)
        monkeypatch.setattr(no_threshold, "embed", held)
        together = post_all(client, requests)
        after = client.post("/search?k=2", files=image(no_threshold, 0))
    # Two passes for the five (verify sends 2 images): the first alone, the rest together;
    # then the one of the request after them.
    assert len(held.sizes) == 3 and sum(held.sizes[:2]) == 6 and held.sizes[2] == 1
    assert [a.status_code for a in together] == [200, 409, 200, 200, 200]
    assert_same_answers([a.json() for a in together], [a.json() for a in alone])
    assert "no calibrated threshold" in together[1].json()["detail"]
    assert together[2].json()["same"] is None and together[2].json()["threshold"] is None
    assert after.status_code == 200  # the worker goes on after a failed kind


def test_the_service_answers_again_after_its_app_shut_down_and_started_again(gallery):
    # Each `with TestClient(app)` is a lifespan: the worker stops at its end, starts again.
    app = create_app(gallery)
    for _ in range(2):
        with TestClient(app) as client:
            assert client.post("/embed", files=image(gallery, 0)).status_code == 200
            assert app.state.batcher.running
        assert not app.state.batcher.running
