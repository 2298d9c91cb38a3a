"""A gallery folder on disk: writing its files together, and reading them back as data.

``index.faiss`` (the faiss index), ``embeddings.npy`` (N, D) float32, ``items.csv`` (id, path,
label, root), ``gallery.json`` (the checkpoint and its sha256, distance, sizes, threshold,
roots, count, times) and ``bad_files.txt`` (``<path>\\t<reason>`` per unreadable file). They
replace the earlier ones together, only once all are written. Everything read is checked as a
stranger's data: a damaged or inconsistent file is one DataError line naming it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch

from siamese.checks import is_int
from siamese.errors import ConfigError, DataError
from siamese.exports import atomic_write, load_index, read_npy, save_index, written_together
from siamese.gallery.items import IN_MEMORY, Item, safe_relative

if TYPE_CHECKING:
    from siamese.module import SiameseModule

INDEX = "index.faiss"
EMBEDDINGS = "embeddings.npy"
ITEMS = "items.csv"
INFO = "gallery.json"
BAD_FILES = "bad_files.txt"
FILES = (INDEX, EMBEDDINGS, ITEMS, INFO)
COLUMNS = ["id", "path", "label", "root"]
FORMAT = 1
REBUILD = "rebuild the gallery with index.py"
# gallery.json: key -> what its value must be (checked on load).
INFO_TYPES: dict[str, tuple[type, ...]] = {
    "format": (int,),
    "checkpoint": (str, type(None)),
    "checkpoint_sha256": (str, type(None)),
    "distance": (str,),
    "metric": (str,),
    "embedding_dim": (int,),
    "threshold": (float, int, type(None)),
    "count": (int,),
    "image_size": (list,),
    "channels": (int,),
    "index": (dict,),
    "roots": (list,),
    "created": (str,),
}


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Stored:
    """A gallery folder as read: its info, items, embeddings, index and skipped files."""

    info: dict[str, Any]
    items: list[Item]
    embeddings: np.ndarray
    index: faiss.Index
    bad_files: list[tuple[str, str]]


def write_folder(
    folder: Path,
    info: dict[str, Any],
    items: list[Item],
    embeddings: np.ndarray,
    index: faiss.Index,
    bad_files: list[tuple[str, str]],
) -> None:
    """Write every file of the gallery; they replace the earlier ones together."""
    folder.mkdir(parents=True, exist_ok=True)
    with written_together("run index.py again"):
        save_index(index, folder / INDEX)
        with atomic_write(folder / EMBEDDINGS, what="embeddings") as f:
            np.save(f, np.ascontiguousarray(embeddings, dtype=np.float32), allow_pickle=False)
        text = io.StringIO(newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows((it.id, it.path, it.label, it.root) for it in items)
        with atomic_write(folder / ITEMS, what="items list") as f:
            f.write(text.getvalue().encode())
        with atomic_write(folder / INFO, what="gallery.json") as f:
            f.write((json.dumps(info, indent=2) + "\n").encode())
        bad = folder / BAD_FILES
        if bad_files or bad.exists():
            lines = "".join(f"{path}\t{reason}\n" for path, reason in sorted(bad_files))
            with atomic_write(bad, what="bad files list") as f:
                f.write(lines.encode())


def read_folder(folder: Path) -> Stored:
    """The gallery in ``folder``, every file checked against the others."""
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise DataError(
            f"gallery_dir={str(folder)!r} {what}; pass the folder index.py wrote "
            "(outputs/index/runs/<time>)"
        )
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"gallery_dir={str(folder)!r} lacks {', '.join(missing)}: not a gallery folder of "
            f"index.py, or an incomplete one; {REBUILD}"
        )
    info = read_info(folder / INFO)
    embeddings = read_npy(folder / EMBEDDINGS, fix=REBUILD)
    dim, count = info["embedding_dim"], info["count"]
    if embeddings.dtype != np.float32 or embeddings.shape != (count, dim):
        raise DataError(
            f"{str(folder / EMBEDDINGS)!r} holds {embeddings.dtype} {embeddings.shape}, but "
            f"gallery.json says {count} float32 embeddings of {dim}; {REBUILD}"
        )
    if not np.isfinite(embeddings).all():
        raise DataError(f"{str(folder / EMBEDDINGS)!r} holds NaN or infinite values; {REBUILD}")
    items = read_items(folder / ITEMS, len(info["roots"]))
    if len(items) != count:
        raise DataError(
            f"{str(folder / ITEMS)!r} has {len(items)} rows but the gallery holds {count} "
            f"embeddings (gallery.json, embeddings.npy); {REBUILD}"
        )
    index = load_index(folder / INDEX, fix=REBUILD)
    if index.ntotal != count or index.d != dim:
        raise DataError(
            f"{str(folder / INDEX)!r} holds {index.ntotal} vectors of {index.d}, but "
            f"items.csv and embeddings.npy hold {count} of {dim}; {REBUILD}"
        )
    wanted = faiss.METRIC_L2 if info["metric"] == "l2" else faiss.METRIC_INNER_PRODUCT
    if index.metric_type != wanted:
        raise DataError(
            f"{str(folder / INDEX)!r} does not search by {info['metric']}, as gallery.json "
            f"says; {REBUILD}"
        )
    return Stored(info, items, embeddings, index, read_bad_files(folder / BAD_FILES))


def read_info(path: Path) -> dict[str, Any]:
    """gallery.json as a dict whose keys have the types INFO_TYPES says."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{str(path)!r} is not readable JSON ({reason}); {REBUILD}") from None
    if not isinstance(info, dict):
        raise DataError(f"{str(path)!r} holds no JSON object; {REBUILD}")
    for key, types in INFO_TYPES.items():
        value = info.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise DataError(
                f"{str(path)!r} has {key}={value!r}, not a {' or '.join(t.__name__ for t in types)}"
                f"; the file is damaged or was edited: {REBUILD}"
            )
    problems = []
    if info["format"] != FORMAT:
        problems.append(f"format {info['format']} (this siamese reads {FORMAT})")
    if info["metric"] not in ("l2", "ip"):
        problems.append(f"metric {info['metric']!r}")
    if info["count"] < 0 or info["embedding_dim"] < 1:
        problems.append(f"count {info['count']} / embedding_dim {info['embedding_dim']}")
    threshold = info["threshold"]
    if threshold is not None and not math.isfinite(threshold):
        problems.append(f"threshold {threshold}")
    if not all(isinstance(r, str) and Path(r).is_absolute() for r in info["roots"]):
        problems.append("roots that are not absolute folders")
    size = info["image_size"]
    if len(size) != 2 or not all(is_int(s) and s > 0 for s in size):
        problems.append(f"image_size {size!r}")
    if problems:
        raise DataError(f"{str(path)!r} has {'; '.join(problems)}; {REBUILD}")
    return info


def read_items(path: Path, n_roots: int) -> list[Item]:
    """items.csv as Items with ids 0..N-1 in order, paths inside their roots."""
    items: list[Item] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != COLUMNS:
                raise DataError(
                    f"{str(path)!r} starts with {header!r}, not the columns "
                    f"{','.join(COLUMNS)}; {REBUILD}"
                )
            for line, row in enumerate(reader, start=2):
                items.append(_item(row, len(items), n_roots, f"{str(path)!r} line {line}"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{str(path)!r} is not a readable items list ({exc}); {REBUILD}") from None
    return items


def _item(row: list[str], expected_id: int, n_roots: int, where: str) -> Item:
    if len(row) != len(COLUMNS):
        raise DataError(f"{where} has {len(row)} fields, not {len(COLUMNS)}; {REBUILD}")
    id_text, path, label, root_text = row
    if id_text != str(expected_id):
        raise DataError(
            f"{where} has id {id_text!r} where {expected_id} belongs (ids are the rows of the "
            f"index, in order); {REBUILD}"
        )
    try:
        root = int(root_text)
    except ValueError:
        root = n_roots  # refused below
    if root == IN_MEMORY and path == "":
        return Item(expected_id, "", label, IN_MEMORY)
    if not 0 <= root < n_roots or not safe_relative(path):
        raise DataError(
            f"{where} names root {root_text!r} and path {path!r}: not a file inside one of "
            f"the gallery's {n_roots} root folder(s); {REBUILD}"
        )
    return Item(expected_id, path, label, root)


def read_bad_files(path: Path) -> list[tuple[str, str]]:
    """bad_files.txt as (path, reason) pairs; none when the file is absent or unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    pairs = (line.split("\t", 1) for line in text.splitlines() if line.strip())
    return [(p[0], p[1] if len(p) > 1 else "") for p in pairs]


def checked_model(
    info: dict[str, Any], folder: Path, ckpt_path: Any, map_location: str | torch.device
) -> SiameseModule:
    """The model of the checkpoint at ``ckpt_path`` or the one gallery.json names, refused
    unless its sha256 is the one recorded there."""
    from siamese.inference import load

    stored = info["checkpoint"]
    path = Path(ckpt_path).expanduser() if ckpt_path else (Path(stored) if stored else None)
    if path is None:
        raise ConfigError(
            f"the gallery in {str(folder)!r} records no checkpoint (built from a model in "
            "memory); pass ckpt_path=<the checkpoint it was built with>"
        )
    if not path.is_file():
        named = "ckpt_path" if ckpt_path else f"{folder / 'gallery.json'} names the checkpoint"
        raise ConfigError(
            f"{named} {str(path)!r}, which is not a file; pass ckpt_path=<where that "
            "checkpoint is now> (its sha256 is checked)"
        )
    expected = info["checkpoint_sha256"]
    if expected is not None and file_sha256(path) != expected:
        raise ConfigError(
            f"ckpt_path={str(path)!r} is not the checkpoint the gallery in {str(folder)!r} was "
            f"built with (sha256 {file_sha256(path)[:12]}... vs {expected[:12]}... in "
            f"gallery.json); pass that checkpoint ({stored}), or index again with this one"
        )
    return load(path, map_location=map_location)
