"""Any folder of images laid out as root/<class>/<image>, or as train/val/test of those."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping, Sequence

from siamese.checks import is_number
from siamese.data.datasets import DataSplits, FileImages
from siamese.data.sources.base import check_image_size, check_seed
from siamese.data.sources.folders import (
    IMAGE_EXTENSIONS,
    UNRESOLVABLE,
    ancestor_keys,
    entry_kind,
    file_type,
    folder_key,
    list_files,
    visible_entries,
    warn_loop,
)
from siamese.data.sources.split import check_train_pairs, stratified_split
from siamese.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}


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
        self.image_size = check_image_size("image_size", image_size)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ConfigError(
                f"data.source.channels must be 1 (grayscale) or 3 (RGB), got {channels!r}"
            )
        self.channels = int(channels)
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not is_number(value) or value < 0:
                raise ConfigError(f"data.source.{key} must be a fraction in [0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"data.source.val_fraction={val_fraction} + "
                f"data.source.test_fraction={test_fraction} leave nothing to train on; "
                "their sum must be below 1"
            )
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = check_seed(seed)
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
        dirs = {entry.name for entry in visible_entries(root) if entry_kind(entry) == "dir"}
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
        entries = visible_entries(folder)
        kinds = {e.name: entry_kind(e) for e in entries}
        class_dirs = [e for e in entries if kinds[e.name] == "dir"]
        stray = [e.name for e in entries if kinds[e.name] not in ("dir", "loop")]
        for e in entries:
            if kinds[e.name] == "loop":
                warn_loop(e.path, UNRESOLVABLE)
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
        above = ancestor_keys(folder) | {folder_key(folder)}
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
                f"{special[0]!r} ({file_type(special[0])}){also} in {folder!r}: not a regular "
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
