"""The API key (headers, the browser's cookie), the Host check and the response headers."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from fastapi.testclient import TestClient
from helpers import assert_fragments

from siamese.service import ServiceSettings, create_app
from siamese.service.security import COOKIE, host_name

KEY = "s3cret-Key_42"


@pytest.fixture(scope="module")
def app(gallery):
    return create_app(gallery, ServiceSettings(api_key=KEY))


@pytest.fixture
def client(app):
    with TestClient(app) as c:  # a fresh cookie jar for each test
        yield c


@pytest.fixture(scope="module")
def image(gallery) -> dict:
    return {"image": ("a.png", gallery.item_file(0).read_bytes())}


def test_health_needs_no_key_and_every_other_route_does(client, image):
    assert client.get("/health").status_code == 200
    for method, path in [
        ("get", "/"),
        ("get", "/docs"),
        ("get", "/openapi.json"),
        ("get", "/items/0/thumbnail"),
        ("post", "/search"),
        ("post", "/identify"),
        ("post", "/verify"),
        ("post", "/embed"),
        ("get", "/no/such/route"),
    ]:
        answer = getattr(client, method)(path)
        assert answer.status_code == 401, (path, answer.text)
        assert answer.headers["www-authenticate"] == "Bearer"
        assert_fragments(answer.json()["detail"], "needs its API key", "X-API-Key", "/?key=")


def test_the_key_passes_as_x_api_key_or_a_bearer_token_and_a_wrong_one_does_not(client, image):
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        answer = client.post("/search?k=1", files=image, headers=headers)
        assert answer.status_code == 200 and len(answer.json()["neighbours"]) == 1
    for headers in (
        {"X-API-Key": KEY[:-1]},
        {"X-API-Key": KEY + "x"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY.upper()}"},
        {"X-API-Key": "é".encode("latin-1")},
    ):
        answer = client.post("/search", files=image, headers=headers)
        assert answer.status_code == 401, headers
    wrong = client.post("/search", files=image, headers={"X-API-Key": "nope"})
    assert_fragments(wrong.json()["detail"], "the API key sent is not this service's key")


def test_opening_the_page_with_the_key_once_sets_a_strict_httponly_cookie(client, image):
    assert client.get("/?key=wrong", follow_redirects=False).status_code == 401
    login = client.get(f"/?key={KEY}", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"  # key off the URL
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
    assert KEY not in cookie  # the browser stores a token derived from the key
    # The client now carries the cookie, as the page's fetches and <img>s do.
    assert client.get("/").status_code == 200
    assert client.post("/search?k=2", files=image).status_code == 200
    assert client.get("/items/3/thumbnail").status_code == 200
    assert client.get("/docs").status_code == 200
    client.cookies.clear()
    client.cookies.set(COOKIE, "0" * 64)
    assert client.get("/").status_code == 401


def test_a_host_header_the_service_does_not_answer_to_is_refused(gallery):
    settings = ServiceSettings(allowed_hosts=("127.0.0.1", "localhost", "::1"))
    with TestClient(create_app(gallery, settings), base_url="http://localhost:8000") as c:
        assert c.get("/health").status_code == 200
        for host in ("127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
            assert c.get("/health", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
            answer = c.get("/health", headers={"host": host})
            assert answer.status_code == 400, host
            assert_fragments(answer.json()["detail"], "answers to the host names", "127.0.0.1")


def test_host_name_drops_the_port_of_names_and_bracketed_ipv6_addresses():
    assert host_name("Example.org:8000") == "example.org"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("[::1]") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("::1") == "::1"  # bare IPv6 (not valid in a Host header): kept whole


def test_every_answer_carries_nosniff_no_referrer_and_no_framing(client):
    for answer in (client.get("/health"), client.get("/"), client.get(f"/?key={KEY}")):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-frame-options"] == "DENY"


def test_the_pages_policy_allows_exactly_its_own_script_and_style(client):
    client.get(f"/?key={KEY}")
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        block = re.search(rf"<{tag}>(.*?)</{tag}>", page.text, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
