"""Bad requests: each gets its status with a JSON ``detail`` of one sentence, and the service
answers the next good request as before."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import assert_fragments, png_bytes

from siamese.service import ServiceSettings, create_app

LIMIT_MB = 0.01  # 10,485 bytes


@pytest.fixture(scope="module")
def client(gallery):
    settings = ServiceSettings(max_upload_mb=LIMIT_MB, max_image_pixels=400)
    with TestClient(create_app(gallery, settings)) as c:
        yield c


@pytest.fixture(scope="module")
def good(gallery) -> bytes:
    return gallery.item_file(0).read_bytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels and whose data is empty: only a
    decoder that reads past the header could fail on it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def one_sentence(answer, status: int) -> str:
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


def still_serving(client, good: bytes) -> None:
    answer = client.post("/search?k=2", files={"image": ("ok.png", good)})
    assert answer.status_code == 200 and len(answer.json()["neighbours"]) == 2


@pytest.mark.parametrize(
    ("path", "files", "data", "fragments"),
    [
        ("/search", {"file": ("a.png", b"x")}, None, ["no file field image", "-F image=@"]),
        ("/identify", None, None, ["no file field image"]),
        ("/embed", {"image": ("a.png", b"")}, None, ["field image is empty (0 bytes)"]),
        ("/search", None, {"image": "hello"}, ["field image holds text, not a file"]),
        (
            "/search",
            {"image": ("a.png", b"GIF89a but not really")},
            None,
            ["not an image this service can read", "send a PNG, JPEG"],
        ),
        ("/verify", {"image_a": ("a.png", b"x")}, None, ["no file field image_b"]),
    ],
)
def test_a_missing_empty_textual_or_undecodable_field_is_422_in_one_sentence(
    client, good, path, files, data, fragments
):
    if files is not None and "image_a" in files:
        files["image_a"] = ("a.png", good)
    answer = client.post(path, files=files, data=data)
    assert_fragments(one_sentence(answer, 422), *fragments)
    still_serving(client, good)


def test_an_image_over_the_pixel_limit_is_422_before_it_is_decoded(client, good):
    bomb = png_header_only(21, 20)  # 420 pixels > 400; its pixel data is missing altogether
    answer = client.post("/search", files={"image": ("bomb.png", bomb)})
    assert_fragments(one_sentence(answer, 422), "too large", "21 x 20 = 420", "limit of 400")
    at_limit = png_bytes(np.zeros((20, 20), dtype=np.uint8))  # 400 pixels: accepted
    assert client.post("/embed", files={"image": ("ok.png", at_limit)}).status_code == 200
    still_serving(client, good)


@pytest.mark.parametrize("k", ["abc", "1.5", "0", "101", "-3"])
def test_a_k_that_is_not_1_to_max_k_is_422_in_one_sentence(client, good, k):
    answer = client.post(f"/search?k={k}", files={"image": ("a.png", good)})
    assert_fragments(one_sentence(answer, 422), f"k={k}", "k=1 to 100")


def test_a_body_over_the_limit_is_413_told_by_its_content_length(client, good):
    big = b"\0" * 11_000  # over 10,485 bytes with or without the multipart wrapping
    answer = client.post("/search", files={"image": ("big.png", big)})
    assert_fragments(one_sentence(answer, 413), "over the service's limit of 0.01 MiB")
    still_serving(client, good)


def test_a_chunked_body_with_no_length_is_cut_off_at_the_limit(client, good):
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    chunks = [head, *[b"\0" * 1000] * 12, f"\r\n--{boundary}--\r\n".encode()]
    answer = client.post(
        "/search",
        content=iter(chunks),  # a generator: sent chunked, with no Content-Length
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_fragments(one_sentence(answer, 413), "over the service's limit")
    still_serving(client, good)


def test_the_limit_stops_reading_a_streamed_body_once_it_is_passed(gallery):
    # At the ASGI level: how many chunks the app pulled of an endless upload.
    app = create_app(gallery, ServiceSettings(max_upload_mb=LIMIT_MB))
    head = (
        b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    pulled, sent = [], []

    async def receive():
        pulled.append(1)
        body = head if len(pulled) == 1 else b"\0" * 4000
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/search",
        "raw_path": b"/search",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"t"), (b"content-type", b"multipart/form-data; boundary=x")],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }
    asyncio.run(app(scope, receive, send))
    # The head and 3 chunks of 4,000 bytes pass 10,485 bytes: no fifth read.
    assert len(head) + 2 * 4000 <= 10_485 < len(head) + 3 * 4000
    assert len(pulled) == 4
    assert sent[0]["status"] == 413
    assert "over the service's limit" in json.loads(sent[1]["body"])["detail"]
    app.state.batcher.close()


@pytest.mark.parametrize("item", ["abc", "-1", "1.0", "8", "99999999999999", "%2e%2e", "٣"])
def test_a_thumbnail_of_anything_but_an_indexed_ids_file_is_404(client, item):
    answer = client.get(f"/items/{item}/thumbnail")
    assert answer.status_code == 404 and isinstance(answer.json()["detail"], str)


def test_a_thumbnail_of_an_in_memory_item_is_404(gallery):
    from siamese.gallery import Gallery

    in_memory = Gallery.from_embeddings(gallery.model, gallery.embeddings, labels=["a"] * 8)
    with TestClient(create_app(in_memory)) as c:
        assert_fragments(one_sentence(c.get("/items/0/thumbnail"), 404), "no indexed item 0")
