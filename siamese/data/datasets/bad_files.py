"""The policy for image files that cannot be decoded: refuse them, or skip and list them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from siamese.errors import DataError

try:  # POSIX: lets finalize_bad_files rewrite the list while workers append to it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)


class ImageReadError(DataError):
    """An image file that cannot be read: one line, also when raised in a DataLoader worker.

    torch re-raises a worker's exception in the main process as ``type(exc)(text)``, where
    ``text`` is "Caught ImageReadError in DataLoader worker process N.\\nOriginal Traceback
    ..." ending in "<module>.ImageReadError: <message>"; the constructor keeps
    ``<message>`` alone, so the command line still reports one sentence.
    """

    def __init__(self, message: str) -> None:
        qualified = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith(f"Caught {type(self).__name__} ") and qualified in message:
            message = message.rsplit(qualified, 1)[1].strip()
        super().__init__(message)


@dataclass
class BadFiles:
    """What to do with image files that cannot be decoded (picklable: workers get a copy).

    Args:
        skip: False refuses the first such file with an ImageReadError naming it; True skips
            it: a warning once per process, and a line in ``log_path``.
        log_path: the list of skipped files, one ``<path>\\t<reason>`` line each, appended by
            every process that meets one; ``finalize_bad_files`` sorts it and keeps each
            path once.
    """

    skip: bool = False
    log_path: str | None = None
    # Unreadable paths met by this process, with their reasons: each is tried and listed once.
    known: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def failed(self, path: str, reason: str) -> None:
        """Refuse ``path`` (skip=False), or record it as skipped (skip=True)."""
        if not self.skip:
            listed = f" and list them in {self.log_path}" if self.log_path else ""
            raise ImageReadError(
                f"cannot read image {path!r} ({reason}); fix or remove it, or set "
                f"data.skip_bad_files=true to skip unreadable images{listed}"
            )
        if path in self.known:
            return
        self.known[path] = reason
        log.warning("skipping unreadable image %r (%s)", path, reason)
        if self.log_path:
            _append_line(self.log_path, f"{path}\t{reason}\n")


def _locked(fd: int) -> None:
    """Hold an exclusive lock on ``fd`` until it is closed (a no-op without fcntl)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _append_line(path: str, line: str) -> None:
    """Append ``line`` to ``path`` in one write (O_APPEND: safe from several processes)."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _locked(fd)  # waits while finalize_bad_files rewrites the list
            os.write(fd, line.encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not list the unreadable image in %r (%s)", path, exc)


def finalize_bad_files(path: str | os.PathLike) -> list[str]:
    """Rewrite the list of skipped files sorted by path, each path once (its first reason).

    Safe while other processes append to it (they wait for the rewrite). Returns the paths
    it lists; a missing file lists none.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "r+", encoding="utf-8", errors="surrogateescape", newline="") as f:
        _locked(fd)
        reasons: dict[str, str] = {}
        for line in f.read().split("\n"):
            file, _, reason = line.partition("\t")
            if file:
                reasons.setdefault(file, reason)
        f.seek(0)
        f.truncate()
        f.write("".join(f"{p}\t{reasons[p]}\n" for p in sorted(reasons)))
    return sorted(reasons)
