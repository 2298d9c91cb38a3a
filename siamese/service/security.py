"""What reaches the app: the Host header, the API key, and the size of a request's body.

Two ASGI middlewares, outermost first:

- ``AccessGuard``: a Host header the service does not answer to gets 400 (a loopback server
  is not reachable through a stranger's DNS name pointed at 127.0.0.1: DNS rebinding); with an
  API key set, every route but /health needs it, as the header ``X-API-Key: KEY`` or
  ``Authorization: Bearer KEY``, or the cookie a browser gets by opening ``/?key=KEY`` once
  (Jupyter's way): that answer is a redirect to ``/`` (the key leaves the address bar) that
  sets an HttpOnly, SameSite=Strict cookie, so the page's own requests and thumbnails carry
  it and other sites' pages cannot. Every answer gets nosniff and no-referrer headers.
- ``UploadLimit``: a body over the limit gets 413, told by Content-Length before anything is
  read, or by counting the bytes as they stream in (a chunked upload has no length).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "siamese_key"
# Added to every answer: no MIME sniffing of thumbnails or JSON, no URL in Referer headers,
# no framing of the page by other sites.
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
# The Host names a loopback server answers to (its own bind address is added).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def cookie_token(api_key: str) -> str:
    """The cookie's value: derived from the key (the key itself is not stored in browsers)."""
    return hmac.new(api_key.encode(), b"siamese service cookie", hashlib.sha256).hexdigest()


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def send_json(send: Send, status: int, detail: str, headers: list[Any] = ()) -> None:
    """A whole JSON answer ``{"detail": ...}``."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AccessGuard:
    """Host check, API key check and security headers, before anything else runs."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, allowed_hosts: tuple[str, ...] | None
    ) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.token = cookie_token(api_key).encode() if api_key else None
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, raw_send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, raw_send)
            return

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await raw_send(message)

        headers = Headers(scope=scope)
        if self.allowed is not None:
            name = host_name(headers.get("host", ""))
            if name not in self.allowed:
                await send_json(
                    send,
                    400,
                    f"this service answers to the host names {', '.join(sorted(self.allowed))}, "
                    f"not {name!r}: open it by one of those",
                )
                return
        if self.key is not None and scope["path"] != "/health":
            if scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
                given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key")
                if given:
                    await self._log_in(send, given[-1].encode())
                    return
            refusal = self._refusal(headers)
            if refusal is not None:
                await send_json(send, 401, refusal, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: Headers) -> str | None:
        """Why a request may not pass (a sentence), or None when it carries the key."""
        assert self.key is not None and self.token is not None
        given = [headers.get("x-api-key")]
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given.append(auth[7:].strip())
        sent = [g.encode("latin-1", "replace") for g in given if g]
        if any(hmac.compare_digest(g, self.key) for g in sent):
            return None
        cookies = headers.get("cookie", "")
        for part in cookies.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(
                value.encode("latin-1", "replace"), self.token
            ):
                return None
        how = (
            "send the header X-API-Key: <key> (or Authorization: Bearer <key>); in a browser, "
            "open /?key=<key> once"
        )
        if sent:
            return f"the API key sent is not this service's key: {how}"
        return f"this service needs its API key (serve.api_key): {how}"

    async def _log_in(self, send: Send, given: bytes) -> None:
        """``/?key=KEY``: the cookie and a redirect to ``/``, or 401 for a wrong key."""
        assert self.key is not None and self.token is not None
        if not hmac.compare_digest(given, self.key):
            await send_json(
                send,
                401,
                "the key in /?key= is not this service's key: open /?key=<serve.api_key>",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        cookie = f"{COOKIE}={self.token.decode()}; HttpOnly; SameSite=Strict; Path=/"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", b"/"),
                    (b"set-cookie", cookie.encode()),
                    (b"cache-control", b"no-store"),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the streamed body passed the limit."""


class UploadLimit:
    """413 for a request body over ``max_bytes``; the server goes on serving."""

    def __init__(self, app: ASGIApp, max_bytes: int, setting: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = (
            f"the request body is over the service's limit of {setting} "
            "(serve.max_upload_mb); send a smaller image"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await send_json(send, 413, self.detail)  # nothing of the body is read
            return
        total = 0
        over = started = False

        async def counted() -> Message:
            nonlocal total, over
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    over = True
                    raise BodyTooLarge(413, self.detail)
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:
                # Whatever the app answers to the cut-off body (its parser may call it a
                # bad request) becomes the 413.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await send_json(send, 413, self.detail)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
            if not started:
                await send_json(send, 413, self.detail)
