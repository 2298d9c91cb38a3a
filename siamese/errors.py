"""User-facing errors: bad config or bad data, reported as one line and a non-zero exit."""

from __future__ import annotations


class SiameseError(Exception):
    """An error caused by the user's input; the message is the whole report (no traceback)."""


class ConfigError(SiameseError, ValueError):
    """An impossible or invalid configuration value."""


class DataError(SiameseError, ValueError):
    """A data set that is missing, empty or malformed."""
