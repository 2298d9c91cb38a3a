"""User-facing errors: bad config or bad data, reported as one line and a non-zero exit."""

from __future__ import annotations

from collections.abc import Callable


class SiameseError(Exception):
    """An error caused by the user's input; the message is the whole report (no traceback)."""


class ConfigError(SiameseError, ValueError):
    """An impossible or invalid configuration value."""


class DataError(SiameseError, ValueError):
    """A data set that is missing, empty or malformed."""


def find_in_chain(
    exc: BaseException, match: Callable[[BaseException], bool]
) -> BaseException | None:
    """The first exception in ``exc``'s chain (itself, then its causes and contexts) that
    ``match`` accepts, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if match(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
