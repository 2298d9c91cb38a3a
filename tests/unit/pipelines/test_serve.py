"""serve.py's job before it serves: settings from conf/serve.yaml, one-line refusals, the
listening socket, and a damaged gallery stopping it at start."""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_fragments, compose_config, tiny_checkpoint, write_class_folders

from siamese.errors import ConfigError, SiameseError
from siamese.gallery import Gallery
from siamese.inference import load
from siamese.pipelines.serve import (
    RedactKey,
    bind,
    check_serve_config,
    is_loopback,
    run_serve,
    url_of,
    uvicorn_config,
)


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv("SIAMESE_API_KEY", raising=False)


def serve_config(tmp_path: Path, *overrides: str):
    return compose_config("serve", ["gallery_dir=/some/gallery", *overrides], tmp_path / "run")


def test_the_defaults_serve_this_machine_only_with_no_key(tmp_path):
    settings = check_serve_config(serve_config(tmp_path))
    assert settings.api_key is None and settings.max_upload_mb == 10
    assert settings.max_image_pixels == 40_000_000 and (settings.k, settings.max_k) == (5, 100)
    assert (settings.identify_by, settings.identify_k, settings.threshold) == ("nearest", 5, None)
    assert (settings.batch_max_size, settings.batch_max_wait_ms) == (32, 1.0)
    assert set(settings.allowed_hosts) == {"127.0.0.1", "localhost", "::1"}


def test_settings_follow_the_command_line_and_the_key_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SIAMESE_API_KEY", "from-the-env")
    cfg = serve_config(
        tmp_path,
        "host=0.0.0.0",
        "threshold=0.25",
        "identify.by=vote",
        "identify.k=3",
        "serve.max_upload_mb=2.5",
        "serve.batch.max_size=4",
    )
    settings = check_serve_config(cfg)
    assert settings.api_key == "from-the-env"
    assert settings.allowed_hosts is None  # a public address answers to any name
    assert (settings.threshold, settings.identify_by, settings.identify_k) == (0.25, "vote", 3)
    assert settings.max_upload_bytes == int(2.5 * 2**20) and settings.batch_max_size == 4
    cfg = serve_config(tmp_path, "serve.api_key=given")
    assert check_serve_config(cfg).api_key == "given"


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["gallery_dir=null"], ["gallery_dir is required", "python serve.py gallery_dir="]),
        (["port=70000"], ["port must be from 0", "65535, got 70000"]),
        (["port=-1"], ["port must be", "got -1"]),
        (["host= "], ["host is empty", "host=127.0.0.1"]),
        (["serve.log_level=loud"], ["serve.log_level='loud' is unknown", "info"]),
        (["serve.max_upload_mb=0"], ["serve.max_upload_mb must be a positive number", "got 0"]),
        (["serve.k=200"], ["serve.k=200 is over serve.max_k=100"]),
        (["identify.by=guess"], ["identify.by='guess' is unknown", "nearest, vote, centroid"]),
        (["threshold=nan"], ["threshold must be a finite number", "got nan"]),
        (["serve.batch.max_wait_ms=5000"], ["serve.batch.max_wait_ms must be", "got 5000"]),
        (["serve.api_key=has space"], ["serve.api_key must be", "a string of 9 characters"]),
        (["serve.api_key=''"], ["serve.api_key must be", "an empty string"]),
    ],
)
def test_settings_that_cannot_work_are_refused_in_one_line(tmp_path, overrides, fragments):
    with pytest.raises(ConfigError) as refused:
        check_serve_config(serve_config(tmp_path, *overrides))
    assert_fragments(str(refused.value), *fragments)
    assert "has space" not in str(refused.value)  # a key is never shown


@pytest.mark.parametrize(
    ("overrides", "limit"),
    [([], 100), (["serve.max_connections=7"], 7), (["serve.max_connections=null"], None)],
)
def test_max_connections_is_uvicorns_concurrency_limit(tmp_path, overrides, limit):
    cfg = serve_config(tmp_path, *overrides)
    check_serve_config(cfg)
    config = uvicorn_config(object(), cfg)
    assert config.limit_concurrency == limit
    assert (config.server_header, config.log_config) == (False, None)


def test_max_connections_0_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as refused:
        check_serve_config(serve_config(tmp_path, "serve.max_connections=0"))
    assert_fragments(
        str(refused.value), "serve.max_connections must be", "(null: no limit)", "got 0"
    )


def test_a_connection_over_max_connections_gets_503_at_once(tmp_path):
    # One request held inside the app fills serve.max_connections=2 with its connection
    # and its task; the next connection is answered 503 instead of queueing.
    import uvicorn

    entered, release = threading.Event(), threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    cfg = serve_config(tmp_path, "serve.max_connections=2", "serve.log_level=critical")
    server = uvicorn.Server(uvicorn_config(app, cfg))
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    first = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    second = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        first.request("GET", "/")
        assert entered.wait(10)
        second.request("GET", "/")
        assert second.getresponse().status == 503
        release.set()
        answer = first.getresponse()
        assert (answer.status, answer.read()) == (200, b"ok")
    finally:
        release.set()
        first.close()
        second.close()
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_port_0_takes_a_free_port_and_a_port_in_use_is_one_line():
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0 and url_of(sock) == f"http://127.0.0.1:{port}/"
        with pytest.raises(ConfigError) as refused:
            bind("127.0.0.1", port)
        assert_fragments(str(refused.value), f"port={port} on 127.0.0.1 is in use", "port=0")
    finally:
        sock.close()


def test_an_ipv6_loopback_url_has_brackets():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        sock = bind("::1", 0)
    except ConfigError:
        pytest.skip("no IPv6 loopback address here")
    try:
        assert url_of(sock) == f"http://[::1]:{sock.getsockname()[1]}/"
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_damaged_gallery_stops_serve_at_start_naming_the_file(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    root = write_class_folders(tmp_path / "images", {"a": 2, "b": 2}, size=6)
    gallery_dir = tmp_path / "gallery"
    Gallery.build(load(ckpt), root, ckpt_path=ckpt).save(gallery_dir)
    index = gallery_dir / "index.faiss"
    index.write_bytes(index.read_bytes()[:40])
    cfg = serve_config(tmp_path, f"gallery_dir={gallery_dir}", "port=0", "device=cpu")
    with pytest.raises(SiameseError) as refused:
        run_serve(cfg)
    assert "\n" not in str(refused.value) and "index.faiss" in str(refused.value)


def test_the_access_log_never_shows_the_key_of_a_browsers_first_visit():
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/?key=s3cret&x=1", "1.1", 303), None,
    )  # fmt: skip
    assert RedactKey().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /?key=<redacted>&x=1 HTTP/1.1" 303'
