"""The service's settings (conf/serve.yaml's ``serve``, ``identify`` and ``threshold``), checked."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from siamese.checks import check_int_setting, is_number
from siamese.errors import ConfigError
from siamese.gallery import IDENTIFY_BY

# What an API key may hold: it travels in an HTTP header, so printable ASCII without spaces.
KEY_CHARACTERS = frozenset(string.ascii_letters + string.digits + string.punctuation)


@dataclass(frozen=True)
class ServiceSettings:
    """What ``create_app`` needs besides the gallery. Every field is checked when it is made
    (ConfigError naming the config key)."""

    # Every route but /health needs it (X-API-Key or Authorization: Bearer, or the cookie
    # that opening /?key=KEY once sets in a browser); None: no key.
    api_key: str | None = None
    # A request body over this many MiB (1 MiB = 2**20 bytes) gets 413.
    max_upload_mb: float = 10.0
    # An image of more pixels (width x height, read before decoding) gets 422.
    max_image_pixels: int = 40_000_000
    # /search's k when the request gives none, and the most a request may ask for.
    k: int = 5
    max_k: int = 100
    # /identify: nearest, vote or centroid, and the neighbours a vote counts.
    identify_by: str = "nearest"
    identify_k: int = 5
    # Overrides the gallery's calibrated threshold for search's `same`, identify and verify.
    threshold: float | None = None
    # Concurrent requests embedded in one forward pass: at most this many per batch; a
    # batch that starts while others wait holds the door this long for more (a lone
    # request never waits).
    batch_max_size: int = 32
    batch_max_wait_ms: float = 1.0
    # Thumbnails: the longest side in pixels, and how many are kept in memory.
    thumbnail_size: int = 128
    thumbnail_cache: int = 1024
    # Host header names served (a DNS-rebinding guard for a loopback server); None: any.
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None and (
            not isinstance(key, str) or not key or not set(key) <= KEY_CHARACTERS
        ):
            raise ConfigError(
                "serve.api_key must be a non-empty string of printable ASCII without spaces "
                f"(it travels in an HTTP header), got {_shown_key(key)}; set another key or "
                "null for none"
            )
        if not is_number(self.max_upload_mb) or self.max_upload_mb <= 0:
            raise ConfigError(
                f"serve.max_upload_mb must be a positive number of MiB, got "
                f"{self.max_upload_mb!r}; e.g. serve.max_upload_mb=10"
            )
        check_int_setting("serve.max_image_pixels", self.max_image_pixels, 1, " (e.g. 40000000)")
        check_int_setting("serve.max_k", self.max_k, 1, " (e.g. 100)")
        check_int_setting("serve.k", self.k, 1, f" of at most serve.max_k={self.max_k}")
        if self.k > self.max_k:
            raise ConfigError(
                f"serve.k={self.k} is over serve.max_k={self.max_k}; lower serve.k or raise "
                "serve.max_k"
            )
        if self.identify_by not in IDENTIFY_BY:
            raise ConfigError(
                f"identify.by={self.identify_by!r} is unknown; choose one of "
                f"{', '.join(IDENTIFY_BY)}"
            )
        check_int_setting("identify.k", self.identify_k, 1, " (e.g. 5)")
        if self.threshold is not None and not is_number(self.threshold):
            raise ConfigError(
                f"threshold must be a finite number (a distance) or null for the gallery's "
                f"calibrated one, got {self.threshold!r}"
            )
        check_int_setting("serve.batch.max_size", self.batch_max_size, 1, " (e.g. 32)")
        wait = self.batch_max_wait_ms
        if not is_number(wait) or not 0 <= wait <= 1000:
            raise ConfigError(
                f"serve.batch.max_wait_ms must be a number of milliseconds from 0 to 1000, "
                f"got {wait!r}; e.g. serve.batch.max_wait_ms=1"
            )
        check_int_setting("serve.thumbnail_size", self.thumbnail_size, 8, " (e.g. 128)")
        check_int_setting("serve.thumbnail_cache", self.thumbnail_cache, 0, " (e.g. 1024)")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def _shown_key(key: Any) -> str:
    """A refused key as an error may show it: its type and length, never the key."""
    if isinstance(key, str):
        return f"a string of {len(key)} characters" if key else "an empty string"
    return f"a {type(key).__name__}"
