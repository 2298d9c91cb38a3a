"""Omniglot for one-shot learning: background alphabets to train, evaluation alphabets to test."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from urllib.error import URLError

import numpy as np

from siamese.checks import is_number
from siamese.data.datasets import DataSplits, FileImages
from siamese.data.sources.base import (
    check_image_size,
    check_seed,
    download_root,
    tidy_on_failure,
)
from siamese.data.sources.folders import entry_kind, visible_entries
from siamese.data.sources.split import check_train_pairs
from siamese.errors import ConfigError, DataError


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
        self.image_size = check_image_size("image_size", image_size)
        if not is_number(val_classes):
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
        self.seed = check_seed(seed)

    def load(self, root: str | os.PathLike | None) -> DataSplits:
        root = os.path.abspath(download_root(root, "Omniglot"))
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
                with tidy_on_failure(root, base):
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
    for alphabet in visible_entries(folder):
        if entry_kind(alphabet) != "dir":  # a link that loops (ln -s x x) is no alphabet
            continue
        for character in visible_entries(alphabet.path):
            if entry_kind(character) != "dir":
                continue
            pngs = [
                e.path for e in visible_entries(character.path) if e.name.lower().endswith(".png")
            ]
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
