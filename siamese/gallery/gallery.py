"""``Gallery``: a trained model with a faiss index of a folder's images, to search and identify.

Build it from a model and a folder (or files, or tensors), ``add`` more, ``search`` images
for their k nearest items, ``identify`` them as a known label or unknown at the calibrated
threshold, ``verify`` pairs, ``save`` it to a folder and ``load`` it back. Distances are the
model's own (``model.compare``'s units, so the calibrated threshold applies): faiss finds the
candidates, the model's distance scores them, ties go to the lower id. A learned head has no
faiss metric: it scores every item.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from siamese.checks import check_int, is_number
from siamese.distances import config_name
from siamese.errors import ConfigError, DataError
from siamese.evaluation.index import build_index, index_kind, search
from siamese.gallery.identify import Identity, class_centroids, vote
from siamese.gallery.items import IN_MEMORY, Item, list_source
from siamese.gallery.reading import embed_files, embed_tensor
from siamese.gallery.store import FORMAT, checked_model, file_sha256, read_folder, write_folder
from siamese.module import SiameseModule

IDENTIFY_BY = ("nearest", "vote", "centroid")
# Candidates asked of faiss past k, re-scored by the model's distance (float32 rounding).
_EXTRA = 8
# Queries x items scored at once by a learned head or a brute-force pass.
_BLOCK = 1 << 22


@dataclass(frozen=True)
class Neighbour:
    """A gallery item found for a query: ``same`` is distance <= threshold (None: no threshold)."""

    id: int
    path: str
    label: str | None
    distance: float
    same: bool | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "label": self.label,
            "distance": self.distance,
            "same": self.same,
        }


def index_settings(index: str | dict[str, Any] | None) -> dict[str, Any]:
    """``index`` (a kind, a settings dict or None) as gallery.json records it: the kind
    (flat by default) and the settings that are not null."""
    if index is None:
        return {"kind": "flat"}
    settings = {"kind": index} if isinstance(index, str) else dict(index)
    settings.setdefault("kind", "flat")
    return {k: v for k, v in settings.items() if v is not None}


class Gallery:
    """A model and the embeddings, items and faiss index of the images it has indexed."""

    def __init__(
        self,
        model: SiameseModule,
        embeddings: np.ndarray,
        items: list[Item],
        roots: list[str],
        index: faiss.Index,
        info: dict[str, Any],
        bad_files: list[tuple[str, str]] | None = None,
    ) -> None:
        self.model = model.eval()
        self.embeddings = embeddings
        self.items = items
        self.roots = roots
        self.index = index
        self.info = info
        self.bad_files = list(bad_files or [])
        self._centroids: tuple[list[str], Tensor] | None = None

    # -- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: SiameseModule,
        source: str | os.PathLike | Sequence[str | os.PathLike] | Tensor,
        *,
        labels: Sequence[str] | None = None,
        index: str | dict[str, Any] | None = "flat",
        ckpt_path: str | os.PathLike | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        progress: bool = False,
    ) -> Gallery:
        """A gallery of ``source``: a folder (every image below it; the class folder's name
        is the label), a list of image files, or a (N, C, H, W) tensor of images in [0, 1].

        ``index``: "flat" (exact), "ivf" or "hnsw", or a dict with ``kind`` and the options
        of ``siamese.evaluation.build_index``. ``ckpt_path``: the checkpoint ``model`` was
        loaded from, recorded with its sha256 so that a later load can check it. Unreadable
        files are skipped and listed in ``bad_files``."""
        gallery = cls._empty(model, index, ckpt_path)
        gallery._append(
            source, labels, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
        if not gallery.items:
            raise DataError(_none_readable(gallery.bad_files))
        gallery.index = build_index(
            gallery.embeddings, metric=gallery.metric, **gallery.info["index"]
        )
        return gallery

    @classmethod
    def from_embeddings(
        cls,
        model: SiameseModule,
        embeddings: np.ndarray | Tensor,
        *,
        labels: Sequence[str] | None = None,
        index: str | dict[str, Any] | None = "flat",
    ) -> Gallery:
        """A gallery of embeddings computed already (``model.embed``'s rows, (N, D)), with
        a label each (or none); its items have no file."""
        gallery = cls._empty(model, index, None)
        emb = np.ascontiguousarray(torch.as_tensor(embeddings).float().cpu().numpy())
        dim = model.tower.embedding_dim
        if emb.ndim != 2 or emb.shape[1] != dim or len(emb) == 0 or not np.isfinite(emb).all():
            raise DataError(
                f"embeddings must be a finite (N, {dim}) array with N >= 1, got shape "
                f"{tuple(emb.shape)}; pass model.embed(images)"
            )
        names = _labels(labels, len(emb))
        gallery.items = [Item(i, "", names[i], IN_MEMORY) for i in range(len(emb))]
        gallery.embeddings = emb
        gallery.info["count"] = len(emb)
        gallery.index = build_index(emb, metric=gallery.metric, **gallery.info["index"])
        return gallery

    @classmethod
    def _empty(
        cls, model: SiameseModule, index: Any, ckpt_path: str | os.PathLike | None
    ) -> Gallery:
        """A gallery of nothing yet, with its gallery.json."""
        model = model.eval()
        dim = model.tower.embedding_dim
        channels, height, width = model.tower.input_shape
        threshold = float(model.threshold)
        ckpt = Path(ckpt_path).absolute() if ckpt_path is not None else None
        info: dict[str, Any] = {
            "format": FORMAT,
            "checkpoint": str(ckpt) if ckpt else None,
            "checkpoint_sha256": file_sha256(ckpt) if ckpt else None,
            "distance": config_name(model.distance),
            "metric": model.distance.faiss_metric,
            "embedding_dim": dim,
            "threshold": None if math.isnan(threshold) else threshold,
            "count": 0,
            "image_size": [height, width],
            "channels": channels,
            "index": index_settings(index),
            "roots": [],
            "created": _now(),
        }
        empty = np.zeros((0, dim), dtype=np.float32)
        return cls(model, empty, [], [], faiss.IndexFlat(dim), info)

    def add(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike] | Tensor,
        *,
        labels: Sequence[str] | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        progress: bool = False,
    ) -> int:
        """Index the images of ``source`` (as ``build`` takes it) that the gallery does not hold
        yet, embedding only those; returns how many were added. A file indexed before is never
        indexed twice; the index keeps its training (IVF lists) and grows."""
        before = len(self.items)
        start = self._append(
            source, labels, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
        if len(self.items) > before:
            self.index.add(np.ascontiguousarray(self.embeddings[start:]))
        return len(self.items) - before

    def _append(
        self,
        source: Any,
        labels: Sequence[str] | None,
        *,
        batch_size: int,
        num_workers: int,
        progress: bool,
    ) -> int:
        """Embed the new images of ``source`` and append them; returns the first new row."""
        start = len(self.items)
        if isinstance(source, Tensor | np.ndarray):
            images = torch.as_tensor(source)
            names = _labels(labels, len(images))
            emb = embed_tensor(self.model, images, batch_size)
            new = [Item(start + i, "", names[i], IN_MEMORY) for i in range(len(images))]
        else:
            listing = list_source(source)
            names = _labels(labels, len(listing.paths)) if labels is not None else listing.labels
            held = {str(self.item_file(it.id)) for it in self.items if it.root != IN_MEMORY}
            every = [os.path.join(listing.root, p) for p in listing.paths]
            todo = [i for i, f in enumerate(every) if f not in held]
            files = [every[i] for i in todo]
            emb, kept, bad = embed_files(
                self.model,
                files,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
            )
            now_read = set(files[p] for p in kept)
            self.bad_files = [b for b in self.bad_files if b[0] not in now_read]
            listed = {b[0] for b in self.bad_files}
            self.bad_files += [(files[p], r) for p, r in bad if files[p] not in listed]
            root = self._root_id(listing.root) if kept else IN_MEMORY
            new = [
                Item(start + j, listing.paths[todo[p]], names[todo[p]], root)
                for j, p in enumerate(kept)
            ]
        if new:
            self.embeddings = np.concatenate([self.embeddings, emb.astype(np.float32)])
            self.items.extend(new)
            self._centroids = None
        self.info.update(count=len(self.items), roots=self.roots, updated=_now())
        return start

    def _root_id(self, root: str) -> int:
        if root not in self.roots:
            self.roots.append(root)
        return self.roots.index(root)

    # -- properties -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def metric(self) -> str:
        return str(self.info["metric"])

    @property
    def threshold(self) -> float | None:
        value = self.info.get("threshold")
        return None if value is None else float(value)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W): what ``embed`` takes."""
        return self.model.tower.input_shape

    def item_file(self, item_id: int) -> Path | None:
        """The file of an indexed item; None for an unknown id or an image given in memory."""
        if not isinstance(item_id, int) or not 0 <= item_id < len(self.items):
            return None
        item = self.items[item_id]
        if item.root == IN_MEMORY:
            return None
        return Path(self.roots[item.root]) / item.path

    # -- searching ------------------------------------------------------------------------
    def embed(self, images: Tensor | np.ndarray) -> np.ndarray:
        """(B, C, H, W) images in [0, 1] (or uint8) -> (B, D) float32 embeddings."""
        return embed_tensor(self.model, torch.as_tensor(images))

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The model's distance between embedding rows a[i] and b[i], float64 (B,)."""
        if len(a) == 0:
            return np.zeros(0)
        return self.model.pair_distance(a, b).astype(np.float64)

    def search(self, images: Tensor | np.ndarray, k: int = 5) -> list[list[Neighbour]]:
        """The k nearest items of each image, nearest first."""
        return self.search_embeddings(self.embed(images), k)

    def search_embeddings(
        self, emb: np.ndarray, k: int = 5, threshold: float | None = None
    ) -> list[list[Neighbour]]:
        """The k nearest items of each embedding row (one index search for all of them)."""
        check_int("k", k, 1, ", e.g. 5")
        ids, dist = self._nearest(np.asarray(emb, dtype=np.float32), k)
        thr = self._threshold(threshold, required=False)
        return [
            [self._neighbour(int(i), float(d), thr) for i, d in zip(row_i, row_d, strict=True)]
            for row_i, row_d in zip(ids, dist, strict=True)
        ]

    def _neighbour(self, item_id: int, distance: float, threshold: float | None) -> Neighbour:
        item = self.items[item_id]
        same = None if threshold is None else bool(distance <= threshold)
        return Neighbour(item.id, item.path, item.label or None, distance, same)

    def _nearest(
        self, emb: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, k') ids and float64 distances of the nearest items (among ``rows`` if given),
        k' = min(k, items); by the model's distance, ties to the lower id."""
        n = len(self.items) if rows is None else len(rows)
        k = min(k, n)
        if len(emb) == 0 or k == 0:
            return np.zeros((len(emb), 0), dtype=np.int64), np.zeros((len(emb), 0))
        if rows is not None or self.info["distance"] == "learned":
            return self._scan(emb, k, rows)
        wanted = min(n, k + _EXTRA)
        params = None
        if index_kind(self.index) == "hnsw":
            ef = max(faiss.downcast_index(self.index).hnsw.efSearch, wanted)
            params = faiss.SearchParametersHNSW(efSearch=ef)
        _, cand = search(self.index, np.ascontiguousarray(emb), wanted, params=params)
        found = cand >= 0
        safe = np.where(found, cand, 0)
        flat_q = np.repeat(emb, safe.shape[1], axis=0)
        dist = self.distances(flat_q, self.embeddings[safe.ravel()]).reshape(safe.shape)
        dist = np.where(found, dist, np.inf)
        order = np.lexsort((safe, dist), axis=1)[:, :k]  # by distance, then id
        return np.take_along_axis(safe, order, 1), np.take_along_axis(dist, order, 1)

    def _scan(
        self, emb: np.ndarray, k: int, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every item (or ``rows``) scored by the model's distance, in blocks."""
        ids = np.arange(len(self.items)) if rows is None else rows
        gal = torch.as_tensor(self.embeddings[ids], device=self.model.device)
        step = max(1, _BLOCK // max(1, len(ids)))
        out_i, out_d = [], []
        with torch.no_grad():
            for s in range(0, len(emb), step):
                q = torch.as_tensor(emb[s : s + step], device=self.model.device)
                d = self.model.distance.to_distance(self.model.distance.pairwise(q, gal))
                d = d.double().cpu().numpy()
                order = np.lexsort((np.broadcast_to(ids, d.shape), d), axis=1)[:, :k]
                out_i.append(ids[order])
                out_d.append(np.take_along_axis(d, order, 1))
        return np.concatenate(out_i), np.concatenate(out_d)

    # -- identifying ----------------------------------------------------------------------
    def identify(
        self,
        images: Tensor | np.ndarray,
        *,
        by: str = "nearest",
        k: int = 5,
        threshold: float | None = None,
    ) -> list[Identity]:
        """A known label for each image, or unknown where its distance is beyond the
        threshold (the gallery's calibrated one unless ``threshold`` is given).

        ``by``: nearest (the nearest labelled item's label), vote (the most frequent label
        among the k nearest labelled items, ties to the label met first; its nearest member's
        distance decides) or centroid (the nearest class mean, re-prepared as the distance
        prepares embeddings)."""
        return self.identify_embeddings(self.embed(images), by=by, k=k, threshold=threshold)

    def identify_embeddings(
        self,
        emb: np.ndarray,
        *,
        by: str = "nearest",
        k: int = 5,
        threshold: float | None = None,
    ) -> list[Identity]:
        """``identify`` for embedding rows."""
        if by not in IDENTIFY_BY:
            raise ConfigError(
                f"identify.by={by!r} is unknown; choose one of {', '.join(IDENTIFY_BY)}"
            )
        check_int("identify.k", k, 1, ", e.g. 5")
        thr = self._threshold(threshold, required=True)
        emb = np.asarray(emb, dtype=np.float32)
        labelled = np.array([i for i, it in enumerate(self.items) if it.label], dtype=np.int64)
        if len(labelled) == 0:
            raise DataError(
                "no item of this gallery has a label (images lie directly in the indexed "
                "folder): index a folder of class folders (root/<class>/<image>) to identify"
            )
        if by == "centroid":
            names, dist = self._centroid_distances(emb)
            best = dist.argmin(axis=1)
            picks = [(names[b], float(dist[r, b])) for r, b in enumerate(best)]
        else:
            rows = None if len(labelled) == len(self.items) else labelled
            ids, dist = self._nearest(emb, 1 if by == "nearest" else k, rows)
            names = [[self.items[int(i)].label for i in row] for row in ids]
            picks = [vote(n, d) for n, d in zip(names, dist, strict=True)]
        return [Identity(name if d <= thr else None, d, d <= thr, name) for name, d in picks]

    def _centroid_distances(self, emb: np.ndarray) -> tuple[list[str], np.ndarray]:
        if self._centroids is None:
            labels = [it.label for it in self.items]
            self._centroids = class_centroids(self.model, self.embeddings, labels)
        names, centroids = self._centroids
        with torch.no_grad():
            q = torch.as_tensor(emb, device=self.model.device)
            d = self.model.distance.to_distance(self.model.distance.pairwise(q, centroids))
        return names, d.double().cpu().numpy()

    def verify(
        self, a: Tensor | np.ndarray, b: Tensor | np.ndarray, threshold: float | None = None
    ) -> list[tuple[float, bool | None]]:
        """(distance, same) of each pair a[i], b[i]; same is None without a threshold."""
        thr = self._threshold(threshold, required=False)
        d = self.distances(self.embed(a), self.embed(b))
        return [(float(x), None if thr is None else bool(x <= thr)) for x in d]

    def _threshold(self, threshold: float | None, required: bool) -> float | None:
        if threshold is not None:
            if not is_number(threshold):
                raise ConfigError(f"threshold={threshold!r} must be a finite number, or null")
            return float(threshold)
        if self.threshold is None and required:
            raise ConfigError(
                "this gallery has no calibrated threshold (its checkpoint had none): pass "
                "threshold=<distance>, or index with the model.ckpt evaluate.py writes"
            )
        return self.threshold

    # -- files ----------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Write index.faiss, embeddings.npy, items.csv, gallery.json (and bad_files.txt)
        into ``folder``; they replace earlier ones together, once all are written."""
        self.info.update(count=len(self.items), roots=self.roots)
        write_folder(
            Path(folder), self.info, self.items, self.embeddings, self.index, self.bad_files
        )

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        *,
        ckpt_path: str | os.PathLike | None = None,
        model: SiameseModule | None = None,
        map_location: str | torch.device = "cpu",
    ) -> Gallery:
        """The gallery saved in ``folder``, with its model: ``model`` as given (the caller
        vouches for it), else the checkpoint at ``ckpt_path`` or the one gallery.json names,
        which must have the sha256 recorded there. A damaged folder or another checkpoint is
        one line naming the file."""
        where = Path(folder).expanduser()
        stored = read_folder(where)
        info = stored.info
        if model is None:
            model = checked_model(info, where, ckpt_path, map_location)
        if model.tower.embedding_dim != info["embedding_dim"]:
            raise ConfigError(
                f"the model embeds into {model.tower.embedding_dim} dimensions but the gallery "
                f"in {str(where)!r} holds {info['embedding_dim']}: pass the model it was built with"
            )
        return cls(
            model,
            stored.embeddings,
            stored.items,
            list(info["roots"]),
            stored.index,
            info,
            stored.bad_files,
        )


def _labels(labels: Sequence[str] | None, n: int) -> list[str]:
    if labels is None:
        return [""] * n
    names = [str(x) for x in labels]
    if len(names) != n:
        raise DataError(f"got {len(names)} labels for {n} images; pass one label per image")
    return names


def _none_readable(bad: list[tuple[str, str]]) -> str:
    if bad:
        path, reason = bad[0]
        return (
            f"none of the {len(bad)} image files of the gallery could be read (e.g. {path!r}: "
            f"{reason}); fix or replace them"
        )
    return "the gallery source holds no images; pass a folder of images"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
