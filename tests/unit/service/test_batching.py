"""Concurrent requests: the same answers as one by one, gathered into one forward pass.

The first request's forward pass is held inside the model until the others have queued
behind it, so that which requests share a batch is certain, not a matter of timing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from helpers import tiny_model

from siamese.gallery import Gallery
from siamese.service import ServiceSettings, create_app


class HeldForwardPasses:
    """Wraps ``gallery.embed`` and records each pass's batch size. Once armed, the next pass
    waits inside the model until ``release`` is set, so the requests sent meanwhile queue
    behind it."""

    def __init__(self, gallery: Gallery) -> None:
        self.embed = gallery.embed
        self.sizes: list[int] = []
        self.armed = True
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, images):
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(30)
        self.sizes.append(len(images))
        return self.embed(images)


def post_all(client, app, held: HeldForwardPasses, requests: list[tuple[str, dict]]) -> list:
    """Send the first request; once its forward pass is held, the others from as many
    threads at once; release the pass when all of them are queued. The answers in order."""
    with ThreadPoolExecutor(len(requests)) as pool:
        try:
            path, files = requests[0]
            futures = [pool.submit(client.post, path, files=files)]
            assert held.entered.wait(30), "the first request never reached the model"
            futures += [pool.submit(client.post, p, files=f) for p, f in requests[1:]]
            deadline = time.monotonic() + 30
            while app.state.batcher.pending() < len(requests) - 1:
                assert time.monotonic() < deadline, "the other requests never queued"
                time.sleep(0.005)
        finally:
            held.release.set()  # a failed wait must not leave the worker held
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
        held = HeldForwardPasses(gallery)
        monkeypatch.setattr(gallery, "embed", held)
        together = [answer.json() for answer in post_all(client, app, held, requests)]
    assert_same_answers(together, alone)
    assert held.sizes == [1, 7]  # the first alone, the 7 that queued meanwhile in one pass
    assert [len(a["neighbours"]) for a in together] == [3, 4] * 4


def test_a_batch_holds_at_most_max_size_requests(gallery, monkeypatch):
    app = create_app(gallery, ServiceSettings(batch_max_size=3, batch_max_wait_ms=0))
    held = HeldForwardPasses(gallery)
    monkeypatch.setattr(gallery, "embed", held)
    with TestClient(app) as client:
        answers = post_all(client, app, held, [("/embed", image(gallery, i)) for i in range(7)])
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
        held = HeldForwardPasses(no_threshold)
        monkeypatch.setattr(no_threshold, "embed", held)
        together = post_all(client, app, held, requests)
        after = client.post("/search?k=2", files=image(no_threshold, 0))
    # Two passes for the five: the first alone, the other four together (verify sends 2
    # images, so 5 rows); then the one of the request after them.
    assert held.sizes == [1, 5, 1]
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
