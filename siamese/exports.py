"""Files a job leaves in its run directory: written atomically, read back with one-line errors.

- ``atomic_write(path)``: a binary file in ``.<name>.tmp`` beside ``path``, fsynced and renamed
  over it, so a kill or a full disk leaves the previous file intact; an OSError while writing
  becomes one line naming the file (``WriteError``). Inside ``written_together`` the renames
  wait for the end of the block, so a job's files are replaced all together or not at all.
- ``load_index`` / ``load_embeddings``: evaluate.py's ``index.faiss`` and ``embeddings/*.npy``
  read back and checked (damage, pickled objects, shapes, labels, NaN, index vs gallery).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from siamese.errors import DataError, SiameseError, find_in_chain

if TYPE_CHECKING:
    import faiss

EMBEDDING_FILES = ("query", "query_labels", "gallery", "gallery_labels")
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class WriteError(SiameseError, OSError):
    """A file could not be written (disk full, no permission): the previous one is kept."""


@dataclass
class _Group:
    then: str
    pending: dict[Path, Path] = field(default_factory=dict)  # target -> its temporary


_GROUP: ContextVar[_Group | None] = ContextVar("siamese_written_together", default=None)


def temporary_path(path: str | os.PathLike) -> Path:
    """Where ``atomic_write`` puts ``path``'s new content until it replaces ``path``."""
    target = Path(path)
    return target.with_name(f".{target.name}.tmp")


def pending_path(path: str | os.PathLike) -> Path:
    """The file holding ``path``'s newest content: its temporary while a group holds it back."""
    group = _GROUP.get()
    target = Path(path)
    return group.pending.get(target, target) if group is not None else target


@contextmanager
def atomic_write(
    path: str | os.PathLike,
    *,
    what: str = "file",
    then: str | None = None,
    error: type[WriteError] = WriteError,
) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` only once it is completely written and fsynced.

    Args:
        what: the kind of file, for the error (``could not write checkpoint '...'``).
        then: what to do once the disk is fixed (default: the group's, else ``try again``).
        error: the WriteError subclass raised when writing fails.
    """
    target = Path(path)
    tmp = temporary_path(target)
    group = _GROUP.get()
    then = then or (group.then if group is not None else "try again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # Inside the try: an exit on the way (a signal's) still removes the temporary.
        if group is None:
            _replace({target: tmp}, what, then, grouped=False, error=error)
        else:
            group.pending[target] = tmp
    except WriteError:
        _discard(tmp)
        raise
    except BaseException as exc:
        _discard(tmp)
        cause = exc if isinstance(exc, OSError) else _hidden_os_error(exc)
        if cause is None:
            raise
        grouped = group is not None
        raise write_error(target, cause, what, then, grouped=grouped, error=error) from exc


@contextmanager
def written_together(then: str) -> Iterator[None]:
    """Files written with ``atomic_write`` in this block replace theirs only when it ends well.

    ``then`` completes a failed write's message: ``..., free some space, then <then>``.
    Inside another such block, this one joins it.
    """
    if _GROUP.get() is not None:
        yield
        return
    group = _Group(then)
    token = _GROUP.set(group)
    try:
        yield
        # Inside the try: an exit between two renames (a signal's) still removes the
        # temporaries not renamed yet.
        _replace(group.pending, "file", then, grouped=True, error=WriteError)
    except BaseException:
        for tmp in group.pending.values():
            _discard(tmp)
        raise
    finally:
        _GROUP.reset(token)


def write_error(
    target: Path,
    exc: OSError,
    what: str = "file",
    then: str = "try again",
    *,
    grouped: bool = False,
    error: type[WriteError] = WriteError,
) -> WriteError:
    """One line: the file, the system's reason, what was kept, and how to go on."""
    reason = os.strerror(exc.errno) if exc.errno else _first_line(exc)
    if exc.errno in _NO_SPACE:
        hint = "free some space"
    elif exc.errno in _NOT_WRITABLE:
        hint = "make the folder writable"
    else:
        hint = "check the disk"
    if grouped:
        kept = "no earlier file was replaced"
    elif target.exists():
        kept = f"the previous {what} there is intact"
    else:
        kept = f"no earlier {what} was there"
    kind = "" if what == "file" else f" {what}"
    return error(f"could not write{kind} {str(target)!r}: {reason}; {kept}; {hint}, then {then}")


def _replace(
    pending: dict[Path, Path], what: str, then: str, *, grouped: bool, error: type[WriteError]
) -> None:
    """Rename each temporary over its target (fsynced already), then make the renames durable."""
    items = list(pending.items())
    for done, (target, tmp) in enumerate(items):
        try:
            os.replace(tmp, target)
        except OSError as exc:
            for _, left in items[done:]:
                _discard(left)
            raise write_error(
                target, exc, what, then, grouped=grouped and done == 0, error=error
            ) from exc
    for folder in {target.parent for target, _ in items}:
        _fsync_dir(folder)


def _hidden_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a writer's RuntimeError (torch's zip writer reports a failed
    ``write`` as ``RuntimeError: ... unexpected pos``, the OSError only as its context)."""
    if not isinstance(exc, RuntimeError):
        return None
    cause = find_in_chain(exc, lambda e: isinstance(e, OSError) and bool(e.errno))
    return cause if isinstance(cause, OSError) else None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _discard(tmp: Path) -> None:
    with suppress(OSError):
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (not possible on every OS: best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- the faiss index ---------------------------------------------------------------------


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """``faiss.write_index`` through ``atomic_write`` (a full disk is one line, old file kept)."""
    import faiss

    with atomic_write(path) as f:
        # Through Python's file, so a failed write is an OSError with its errno, not a
        # RuntimeError carrying faiss's C++ text.
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def load_index(
    path: str | os.PathLike, fix: str = "run evaluate.py again to rewrite it"
) -> faiss.Index:
    """The faiss index in ``path`` (evaluate.py's ``index.faiss``); one line if it is damaged,
    ending in ``fix``."""
    import faiss

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(
            f"index file {str(file)!r} does not exist; pass the index.faiss of an evaluate.py "
            "run (written with eval.save_index=true)"
        )
    if file.stat().st_size == 0:
        raise DataError(f"{str(file)!r} is not a readable faiss index (the file is empty); {fix}")
    try:
        return faiss.read_index(str(file))
    except (RuntimeError, MemoryError) as exc:
        raise DataError(
            f"{str(file)!r} is not a readable faiss index ({_faiss_reason(exc, file)}); {fix}"
        ) from None


def _faiss_reason(exc: BaseException, file: Path) -> str:
    """faiss's C++ message (``Error in <signature> at <file>:<line>: ...``) as a few words."""
    text = str(exc).strip()
    short = re.search(r"read error in .*: (\d+) != (\d+)", text)
    if short is not None:
        size = file.stat().st_size
        return f"the file ends early: {size} bytes, cut off part way through"
    unknown = re.search(r"Index type (0x[0-9a-fA-F]+)", text)
    if unknown is not None:
        return f"unknown index type {unknown.group(1)}: not a faiss index, or damaged"
    if isinstance(exc, MemoryError) or "bad_alloc" in text:
        return "it asks for more memory than there is: damaged"
    text = re.sub(r"^Error in .*? at \S+:\d+:\s*", "", text)
    text = re.sub(r"^Error: '.*?' failed:\s*", "", text)
    return text.splitlines()[0] if text else type(exc).__name__


# --- the embeddings ----------------------------------------------------------------------


@dataclass(frozen=True)
class Embeddings:
    """evaluate.py's ``embeddings/`` folder: query and gallery embeddings with their labels."""

    query: np.ndarray  # (Nq, D) float32
    query_labels: np.ndarray  # (Nq,) int64
    gallery: np.ndarray  # (Ng, D) float32, the vectors of index.faiss in its order
    gallery_labels: np.ndarray  # (Ng,) int64


def save_embeddings(
    folder: str | os.PathLike,
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
) -> None:
    """Write ``<folder>/{query,query_labels,gallery,gallery_labels}.npy`` atomically."""
    arrays = (query, query_labels, gallery, gallery_labels)
    for name, array in zip(EMBEDDING_FILES, arrays, strict=True):
        with atomic_write(Path(folder) / f"{name}.npy") as f:
            np.save(f, array, allow_pickle=False)


def load_embeddings(
    folder: str | os.PathLike, index: faiss.Index | str | os.PathLike | None = None
) -> Embeddings:
    """evaluate.py's embeddings read back and checked; one line naming the file if not right.

    Args:
        folder: the ``embeddings/`` folder, or the run directory holding it.
        index: an index (or its file) to check against the gallery: same dimension, and one
            vector per gallery row.
    """
    root = Path(folder).expanduser()
    if not (root / "query.npy").exists() and (root / "embeddings").is_dir():
        root = root / "embeddings"
    if not root.is_dir():
        raise DataError(
            f"embeddings folder {str(root)!r} does not exist; pass the embeddings/ folder (or "
            "the run directory) of an evaluate.py run"
        )
    paths = {name: root / f"{name}.npy" for name in EMBEDDING_FILES}
    query = _embeddings(paths["query"])
    gallery = _embeddings(paths["gallery"])
    query_labels = _labels(paths["query_labels"], len(query), paths["query"])
    gallery_labels = _labels(paths["gallery_labels"], len(gallery), paths["gallery"])
    if query.shape[1] != gallery.shape[1]:
        raise DataError(
            f"{str(paths['query'])!r} holds {query.shape[1]}-dimensional embeddings but "
            f"{str(paths['gallery'])!r} holds {gallery.shape[1]}-dimensional ones; both must "
            "come from the same evaluate.py run"
        )
    if index is not None:
        _check_index(index, gallery, paths["gallery"])
    return Embeddings(query, query_labels, gallery, gallery_labels)


def _check_index(index: faiss.Index | str | os.PathLike, gallery: np.ndarray, path: Path) -> None:
    if isinstance(index, str | os.PathLike):
        name = repr(str(Path(index).expanduser()))
        index = load_index(index)
    else:
        name = "the index"
    if index.d != gallery.shape[1]:
        raise DataError(
            f"{name} holds {index.d}-dimensional vectors but {str(path)!r} holds "
            f"{gallery.shape[1]}-dimensional ones; pass the index.faiss of the same run"
        )
    if index.ntotal != len(gallery):
        raise DataError(
            f"{name} holds {index.ntotal} vectors but {str(path)!r} has {len(gallery)} rows; "
            "pass the index.faiss of the same run"
        )


def _embeddings(path: Path) -> np.ndarray:
    emb = read_npy(path)
    if emb.ndim != 2 or 0 in emb.shape:
        raise DataError(
            f"{str(path)!r} holds an array of shape {emb.shape}; expected (N, D) embeddings "
            "with N, D >= 1"
        )
    if emb.dtype.kind != "f":
        raise DataError(
            f"{str(path)!r} holds {emb.dtype} values; expected float embeddings "
            "(evaluate.py writes float32)"
        )
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    bad_rows = int((~np.isfinite(emb)).any(axis=1).sum())
    if bad_rows:
        raise DataError(
            f"{str(path)!r} has non-finite values (NaN or inf, or too large for float32) in "
            f"{bad_rows} of its {len(emb)} rows; evaluate a checkpoint whose embeddings are finite"
        )
    return emb


def _labels(path: Path, rows: int, emb_path: Path) -> np.ndarray:
    labels = read_npy(path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{str(path)!r} holds {labels.dtype} values of shape {labels.shape}; expected (N,) "
            "integer labels"
        )
    if len(labels) != rows:
        raise DataError(
            f"{str(path)!r} has {len(labels)} labels but {str(emb_path)!r} has {rows} rows; "
            "both must come from the same evaluate.py run"
        )
    return labels.astype(np.int64)


_REWRITE = "run evaluate.py again to rewrite it"


def read_npy(path: Path, fix: str | None = None) -> np.ndarray:
    """A plain-number ``.npy`` array; a damaged file or pickled objects are one line (none run),
    ending in ``fix`` (default: evaluate.py's)."""
    if not path.is_file():
        raise DataError(
            f"{str(path)!r} is missing; "
            + (fix or "evaluate.py writes it with eval.save_embeddings=true")
        )
    damaged = f"{str(path)!r} is not a readable .npy array"
    fix = fix or _REWRITE
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise EOFError("the file is empty")
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
            data_bytes = size - f.tell()
    except (ValueError, OSError, EOFError) as exc:
        reason = _first_line(exc)
        if "magic string" in reason:
            reason = "it does not start with numpy's .npy header"
        elif reason.startswith("EOF"):
            reason = "it is cut off inside its header"
        raise DataError(f"{damaged} ({reason}); {fix}") from None
    if dtype.hasobject:
        # np.load(allow_pickle=False) refuses these too; saying so here names the reason.
        raise DataError(
            f"{str(path)!r} holds pickled Python objects (dtype {dtype}) that would run code "
            "when loaded; refused, nothing was run: "
            + (fix if fix != _REWRITE else "pass the plain-number .npy files evaluate.py writes")
        )
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data_bytes < expected:
        raise DataError(
            f"{damaged} (it is cut off: its header promises {dtype} {tuple(shape)}, {expected} "
            f"bytes, but {data_bytes} follow); {fix}"
        )
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = _first_line(exc)
        raise DataError(f"{damaged} ({reason}); {fix}") from None
