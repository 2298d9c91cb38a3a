"""Labelled image sets: in-memory tensors or image files, fetched a whole batch at a time.

Every source in ``siamese.data.sources`` returns these, so samplers, pair builders and the
data module see one interface: ``targets`` (N,) int64, ``classes``, ``__getitem__`` for one
item and ``__getitems__`` for a batch (used by the DataLoader, so tensor data is sliced in
one indexing operation instead of N Python calls).

Image files are decoded when read, never when a set is built. A file that cannot be decoded
is handled by the set's ``BadFiles`` policy: refused with its path (the default), or skipped
and listed in ``bad_files.txt``. A skipped image is replaced in training batches
(``__getitems__``: another image of its class, so batches keep their shape and labels) and
left out in evaluation (``read``: fewer rows, with the item indices of those kept).
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

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
    ..." ending in "siamese.data.datasets.ImageReadError: <message>"; the constructor keeps
    ``<message>`` alone, so the command line still reports one sentence.
    """

    def __init__(self, message: str) -> None:
        qualified = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith(f"Caught {type(self).__name__} ") and qualified in message:
            message = message.rsplit(qualified, 1)[1].strip()
        super().__init__(message)


class UndecodableImage(Exception):
    """Raised by ``decode_image``: the file could not be decoded, for ``reason`` (a few words)."""

    @property
    def reason(self) -> str:
        return str(self.args[0])


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


class LabelledImages(Dataset):
    """Base class: images with integer class labels; items are float32 (C, H, W) in [0, 1]."""

    targets: Tensor  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return int(self.targets.numel())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every item."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int] | Tensor) -> LabelledImages:
        """The items at ``indices`` as a set of the same kind (classes keep their numbers)."""
        raise NotImplementedError

    def resized(self, image_size: tuple[int, int]) -> LabelledImages:
        """The same items delivered at ``image_size`` (H, W)."""
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(images, labels, kept)`` of the items at ``indices`` that can be read.

        For evaluation: where ``__getitems__`` (training) replaces a skipped unreadable image
        by another of its class, ``read`` leaves it out; ``kept`` (M,) int64 holds the item
        indices of the M rows, in the order asked for. In-memory sets keep every item.
        """
        images, labels = self.__getitems__(indices)
        return images, labels, torch.as_tensor(indices, dtype=torch.int64).reshape(-1)

    def with_bad_files(self, bad_files: BadFiles) -> LabelledImages:
        """The same items, unreadable files handled by ``bad_files`` (tensors have none)."""
        return self


class TensorImages(LabelledImages):
    """Images held in memory as a uint8 (N, C, H, W) or float (N, C, H, W) tensor in [0, 1]."""

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str]) -> None:
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[0] != targets.numel():
            raise DataError(
                f"{images.shape[0]} images but {targets.numel()} labels; they must match"
            )
        self.images = images.contiguous()
        self.targets = targets.to(torch.int64).reshape(-1)
        self.classes = list(classes)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self.images.is_cuda:
            # From pinned memory the copy is queued behind the GPU's work; from pageable
            # memory the driver may wait for that work first (a sync every batch).
            idx = idx.pin_memory()
        idx = idx.to(self.images.device, non_blocking=True)
        images = self.images[idx]
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).div_(255.0)
        return images, self.targets[idx]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: Sequence[int] | Tensor) -> TensorImages:
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return TensorImages(self.images[idx], self.targets[idx], self.classes)

    def to(self, device: torch.device | str) -> TensorImages:
        """The same set held on ``device`` (batches are then sliced there)."""
        return TensorImages(self.images.to(device), self.targets.to(device), self.classes)

    def resized(self, image_size: tuple[int, int]) -> TensorImages:
        if tuple(image_size) == self.images.shape[2:]:
            return self
        out = []
        for start in range(0, len(self.images), 4096):  # bounded memory for big sets
            chunk = self.images[start : start + 4096].to(torch.float32)
            chunk = F.interpolate(
                chunk, size=tuple(image_size), mode="bilinear", antialias=True, align_corners=False
            )
            out.append(
                chunk.round_().clamp_(0, 255).to(torch.uint8)
                if self.images.dtype == torch.uint8
                else chunk
            )
        return TensorImages(torch.cat(out), self.targets, self.classes)


class FileImages(LabelledImages):
    """Images read from files on demand, converted to ``channels`` and resized to ``image_size``.

    Nothing is opened at construction, so a folder of many files indexes quickly. A file that
    cannot be decoded is refused or skipped as ``bad_files`` says (default: refused, with a
    one-line ImageReadError naming it).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Tensor | Sequence[int],
        classes: Sequence[str],
        image_size: tuple[int, int],
        channels: int,
        bad_files: BadFiles | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise DataError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.paths = [str(p) for p in paths]
        self.targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
        if len(self.paths) != self.targets.numel():
            raise DataError(f"{len(self.paths)} files but {self.targets.numel()} labels")
        self.classes = list(classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = channels
        self.bad_files = bad_files if bad_files is not None else BadFiles()

    def _read_one(self, index: int) -> Tensor | None:
        """Item ``index``'s image, or None when it is unreadable and skipped."""
        path = self.paths[index]
        if path in self.bad_files.known:
            return None
        try:
            return decode_image(path, self.image_size, self.channels)
        except UndecodableImage as exc:
            self.bad_files.failed(path, exc.reason)  # raises unless skipping
            return None

    def _stand_in(self, index: int) -> Tensor:
        """A readable image of item ``index``'s class in place of its unreadable one: the
        next of that class in item order, cycling (deterministic, same label)."""
        label = int(self.targets[index])
        members = (self.targets == label).nonzero().squeeze(1).tolist()
        at = members.index(index)
        for other in members[at + 1 :] + members[:at]:
            image = self._read_one(other)
            if image is not None:
                return image
        path = self.paths[index]
        raise ImageReadError(
            f"every image of class {self.classes[label]!r} in this split is unreadable "
            f"({len(members)} file(s), e.g. {path!r}: {self.bad_files.known.get(path)}); "
            "fix or remove them, or remove the class folder"
        )

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        images = []
        for i in idx.tolist():
            image = self._read_one(i)
            images.append(image if image is not None else self._stand_in(i))
        return self._stack(images), self.targets[idx]

    def read(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        read = [(i, self._read_one(i)) for i in idx]
        kept = torch.as_tensor([i for i, image in read if image is not None], dtype=torch.int64)
        images = self._stack([image for _, image in read if image is not None])
        return images, self.targets[kept], kept

    def _stack(self, images: list[Tensor]) -> Tensor:
        return torch.stack(images) if images else torch.empty((0, *self.image_shape))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size[0], self.image_size[1]

    def _like(
        self,
        paths: list[str] | None = None,
        targets: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        bad_files: BadFiles | None = None,
    ) -> FileImages:
        """A copy with some of its files, size or bad-file policy replaced."""
        return FileImages(
            self.paths if paths is None else paths,
            self.targets if targets is None else targets,
            self.classes,
            image_size or self.image_size,
            self.channels,
            bad_files or self.bad_files,
        )

    def resized(self, image_size: tuple[int, int]) -> FileImages:
        return self._like(image_size=image_size)

    def subset(self, indices: Sequence[int] | Tensor) -> FileImages:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        return self._like([self.paths[i] for i in idx], self.targets[idx])

    def with_bad_files(self, bad_files: BadFiles) -> FileImages:
        return self._like(bad_files=bad_files)


class WithIndices(Dataset):
    """Batches of ``(images, labels, indices)``: evaluation puts embeddings back in item order,
    so metrics do not depend on the order batches were drawn in. Skipped unreadable images
    are left out (``LabelledImages.read``): a batch may have fewer rows than indices asked."""

    def __init__(self, images: LabelledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        return self.images.read(indices)


class ConcatImages(LabelledImages):
    """Several sets of the same classes and image shape, read as one (e.g. every split).

    Refuses sets whose class lists differ: their label numbers would mean different classes.
    """

    def __init__(self, parts: Sequence[LabelledImages]) -> None:
        if not parts:
            raise DataError("nothing to concatenate: pass at least one set of images")
        first = parts[0]
        for part in parts[1:]:
            if part.classes != first.classes or part.image_shape != first.image_shape:
                raise DataError(
                    "the splits have different classes or image shapes, so their labels "
                    "cannot be merged; evaluate one split at a time"
                )
        self.parts = list(parts)
        self.classes = list(first.classes)
        self.targets = torch.cat([p.targets for p in parts])
        self._starts = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        part = torch.searchsorted(self._starts, idx, right=True) - 1
        images = torch.empty((len(idx), *self.image_shape))
        for p in part.unique().tolist():
            where = (part == p).nonzero().squeeze(1)
            local = (idx[where] - self._starts[p]).tolist()
            images[where] = self.parts[p].__getitems__(local)[0]
        return images, self.targets[idx]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.parts[0].image_shape

    def subset(self, indices: Sequence[int] | Tensor) -> LabelledImages:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) == 0:
            return self.parts[0].subset(idx)
        part = torch.searchsorted(self._starts, idx, right=True) - 1
        # Consecutive runs from one part keep the order of ``indices``.
        breaks = (part[1:] != part[:-1]).nonzero().squeeze(1) + 1
        runs = torch.tensor_split(torch.arange(len(idx)), breaks)
        return ConcatImages(
            [self.parts[int(part[r[0]])].subset(idx[r] - self._starts[part[r[0]]]) for r in runs]
        )

    def read(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        part = torch.searchsorted(self._starts, idx, right=True) - 1
        images = torch.empty((len(idx), *self.image_shape))
        kept = torch.zeros(len(idx), dtype=torch.bool)
        for p in part.unique().tolist():
            where = (part == p).nonzero().squeeze(1)
            local = idx[where] - self._starts[p]
            got, _, got_items = self.parts[p].read(local.tolist())
            # A file is readable or not wherever it is asked for: membership is enough.
            rows = where[torch.isin(local, got_items)]
            images[rows] = got.to(images.device)
            kept[rows] = True
        return images[kept], self.targets[idx[kept]], idx[kept]

    def resized(self, image_size: tuple[int, int]) -> ConcatImages:
        return ConcatImages([p.resized(image_size) for p in self.parts])

    def with_bad_files(self, bad_files: BadFiles) -> ConcatImages:
        return ConcatImages([p.with_bad_files(bad_files) for p in self.parts])


def decode_image(path: str, image_size: tuple[int, int], channels: int) -> Tensor:
    """One image file as float32 (C, H, W) in [0, 1]: ``channels`` 1 or 3, ``image_size`` (H, W).

    The image is turned upright as its EXIF orientation tag says (phone photos are stored
    sideways with such a tag). A JPEG at least twice the size asked for is decoded at 1/2,
    1/4 or 1/8 scale (libjpeg's draft mode) before resizing, so huge photos cost little.
    Raises UndecodableImage(reason) for anything but a regular file (a FIFO would block the
    reader forever), for any file PIL cannot decode, and for images over PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` pixels).
    """
    from PIL import Image, ImageOps
    from torchvision.transforms.functional import pil_to_tensor

    mode = "L" if channels == 1 else "RGB"
    h, w = image_size
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse those as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_regular(path) as f, Image.open(f) as img:
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                # Draft sizes apply to the stored pixels, which a 90-degree tag turns.
                img.draft(mode, (h, w) if orientation in (5, 6, 7, 8) else (w, h))  # JPEG only
                img.load()
                if orientation != 1:
                    img = ImageOps.exif_transpose(img)
                img = to_mode(img, mode)
                if img.size != (w, h):
                    img = img.resize((w, h), Image.BILINEAR)
    except UndecodableImage:
        raise
    except Exception as exc:  # a damaged file can make a decoder raise almost anything
        raise UndecodableImage(_reason(path, exc)) from None
    return pil_to_tensor(img).to(torch.float32).div_(255.0)


# EXIF tag 0x0112: how the stored pixels are turned (1 upright, 6 = rotate 90 degrees...).
_EXIF_ORIENTATION = 0x0112


def _open_regular(path: str) -> BinaryIO:
    """``path`` opened for binary reading, refused (UndecodableImage) unless it is a regular
    file. Opened non-blocking and checked on the open descriptor: a plain open of a FIFO
    waits for a writer forever, and checking the path first would leave a race."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UndecodableImage(f"not a regular file but {special_file_type(mode)}")
        return os.fdopen(fd, "rb")  # O_NONBLOCK changes nothing for regular files
    except BaseException:
        os.close(fd)
        raise


def special_file_type(mode: int) -> str:
    """What a file that is not regular is, in words, from its ``st_mode``."""
    for test, name in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "a special file"


def _reason(path: str, exc: Exception) -> str:
    """Why ``path`` could not be decoded, in a few words on one line."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"too large to decode safely: {str(exc).rstrip('.')}"
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty:
        return "empty file (0 bytes)"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL recognises, or a damaged header"
    if isinstance(exc, OSError) and exc.strerror:  # missing file, permission denied, ...
        return exc.strerror
    text = " ".join(str(exc).replace(repr(path), "").replace(path, "").split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# 16/32-bit integer and float modes: scaled to 8 bits by ``_to_uint8``.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def to_mode(img, mode: str):
    """Convert a PIL image to 'L' or 'RGB': deep (16-bit, 32-bit, float) images scaled to 8
    bits, transparency composited on white, CMYK/palette/1-bit/YCbCr through RGB."""
    from PIL import Image

    transparent = img.mode in _ALPHA_MODES or "transparency" in img.info
    if img.mode == mode and not transparent:
        return img
    if img.mode in _DEEP_MODES:
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L")
    elif transparent:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img.convert(mode)


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """A deep single-channel image as uint8. 16-bit (``I;16*``): value / 257. ``I`` and ``F``
    by their range: 0..1 (``F`` only) x 255, 0..255 as is, 0..65535 / 257; any other range
    is stretched from its minimum to its maximum. NaN and infinities become 0."""
    x = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        x = x / 257.0
    elif lo < 0 or hi > 65535:
        x = (x - lo) * (255.0 / (hi - lo))
    elif mode == "F" and hi <= 1:
        x = x * 255.0
    elif hi > 255:
        x = x / 257.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


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


@dataclass
class DataSplits:
    """The three splits of one data set, and what a model needs to know about its images."""

    train: LabelledImages
    val: LabelledImages
    test: LabelledImages

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    def as_tuple(self) -> tuple[LabelledImages, LabelledImages, LabelledImages]:
        return self.train, self.val, self.test


def identity_collate(batch):
    """Collate for ``__getitems__`` datasets: the batch is already stacked."""
    return batch
