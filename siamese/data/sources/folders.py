"""Walking image folders without opening a file: visible entries, linked folders, link loops."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass, field

from siamese.data.datasets import special_file_type
from siamese.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)
# Never data: left by unzipping an archive made on macOS; ignored silently like hidden ones.
IGNORED_FOLDERS = frozenset({"__MACOSX"})


def visible_entries(folder: str) -> list[os.DirEntry]:
    """Entries of ``folder`` sorted by name, hidden ones ('.name') and macOS's ``__MACOSX``
    (left by unzipping an archive made on a Mac) left out."""
    try:
        with os.scandir(folder) as it:
            return sorted(
                (e for e in it if not e.name.startswith(".") and e.name not in IGNORED_FOLDERS),
                key=lambda e: e.name,
            )
    except OSError as exc:
        raise DataError(
            f"cannot list the folder {folder!r} ({exc.strerror}); fix its permissions or "
            "remove it from the data"
        ) from None


@dataclass
class FileListing:
    """The files below a folder, each list sorted by path.

    ``images`` are the entries with an image extension, ``special`` those of them that are
    no regular file (a FIFO, socket or device: opening one can block forever), ``others``
    the files without an image extension.
    """

    images: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)


def list_files(folder: str, above: set[tuple[int, int]] | None = None) -> FileListing:
    """Every file below ``folder``, following linked folders, opening no file.

    A linked folder is followed (data sets are often linked in), except a link back to a
    folder above it, which would be walked forever: it is skipped with a warning, as is a
    link that cannot be resolved at all (``ln -s x x``). ``above`` holds the (st_dev,
    st_ino) of folders above ``folder`` (by default every ancestor of its real path).
    Hidden entries and ``__MACOSX`` are left out. Image-named entries that are not regular
    files are listed in ``images`` too (with the reason to refuse or skip them when read,
    as for any unreadable image) and in ``special``.
    """
    out = FileListing()
    ancestors = ancestor_keys(folder) if above is None else set(above)
    top = folder_key(folder)
    if top in ancestors:
        warn_loop(folder)
        return out
    pending = [(folder, frozenset(ancestors | {top}))]
    while pending:
        path, chain = pending.pop()
        for entry in visible_entries(path):
            kind = entry_kind(entry)
            if kind == "loop":
                warn_loop(entry.path, UNRESOLVABLE)
            elif kind == "dir":
                key = folder_key(entry.path)
                if key in chain:
                    warn_loop(entry.path)
                else:
                    pending.append((entry.path, chain | {key}))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                out.images.append(entry.path)
                if kind == "special":
                    out.special.append(entry.path)
            else:
                out.others.append(entry.path)
    out.images.sort()
    out.special.sort()
    out.others.sort()
    return out


def entry_kind(entry: os.DirEntry) -> str:
    """What ``entry`` is, links followed: "dir", "file" (regular), "special" (a FIFO,
    socket or device), "loop" (a link that cannot be resolved: too many levels) or
    "missing" (a dangling link, or one that cannot be inspected: reading it will say why)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        entry.stat()
    except OSError as exc:
        return "loop" if exc.errno == errno.ELOOP else "missing"
    return "special"


def folder_key(path: str) -> tuple[int, int]:
    """The identity of the folder ``path`` (links followed)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def ancestor_keys(folder: str) -> set[tuple[int, int]]:
    """The identities of every folder above ``folder``'s real path, up to the file system
    root: a link to any of them would lead the walk back into itself."""
    keys = set()
    path = os.path.realpath(folder)
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return keys
        path = parent
        with contextlib.suppress(OSError):  # an unreadable ancestor cannot be linked to
            keys.add(folder_key(path))


UNRESOLVABLE = "it cannot be resolved (too many levels of symbolic links)"


def warn_loop(path: str, why: str = "it leads back to a folder above it, a loop") -> None:
    log.warning(
        "skipping the symbolic link %r: %s; remove it, or point it at the folder it should add",
        path,
        why,
    )


def file_type(path: str) -> str:
    """'a named pipe (FIFO)', 'a socket', ...: what the non-regular file ``path`` is."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.strerror or "cannot be inspected"
    return special_file_type(mode)
